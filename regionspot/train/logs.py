"""Training logs on rank 0: a rich progress bar, TensorBoard events, and metrics.jsonl.

metrics.jsonl holds one JSON object per logged step: {"step", "loss", "lr", "samples_per_s",
"regions_per_s"}; loss is the mean over the steps since the previous line (all ranks' micro-batches).
A run that starts at step S (0 when new) first drops the lines past S that an earlier run left there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from regionspot.progress import progress_bar


class TrainLog:
    def __init__(self, run: Path, enabled: bool, total: int, start: int, every: int):
        self.enabled, self.total, self.every = enabled, total, every
        self._reset()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is only needed where logs are written

        self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start + 1)
        path = run / "metrics.jsonl"
        if path.exists():  # drop what a stopped run logged after the checkpoint this run starts from
            kept = [
                line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")
        self.progress = progress_bar("train", "step", info=True)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def _reset(self) -> None:
        self.t0, self.samples, self.regions, self.loss_sum, self.count = time.perf_counter(), 0, 0, 0.0, 0

    def step(self, step: int, loss: float | None, lr: float, samples: int, regions: int) -> dict | None:
        """Record a finished step (`loss` may be None on steps that do not read it back from the device)."""
        self.samples += samples
        self.regions += regions
        if loss is not None:
            self.loss_sum += loss
            self.count += 1
        if not self.enabled:
            return None
        self.progress.update(self.task, completed=step)
        if step % self.every and step != self.total:
            return None
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record = {
            "step": step,
            "loss": self.loss_sum / max(self.count, 1),
            "lr": lr,
            "samples_per_s": self.samples / elapsed,
            "regions_per_s": self.regions / elapsed,
        }
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k in ("loss", "lr", "samples_per_s"):
            self.tb.add_scalar(f"train/{k}", record[k], step)
        shown = f"{record['loss']:.4f}" if math.isfinite(record["loss"]) else str(record["loss"])
        self.progress.update(
            self.task, info=f"loss {shown}  lr {lr:.2e}  {record['samples_per_s']:.1f} samples/s"
        )
        self._reset()
        return record

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.tb.close()
            self.jsonl.close()
