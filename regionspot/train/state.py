"""Training checkpoints: write a step directory, and read one back to resume (DESIGN.md §5).

`runs/NAME/checkpoints/step-NNNNNNN/`:
  head.safetensors   the head (`models.checkpoint.save_head`; metadata: config, fingerprint, step)
  trainer_state.pt   {"step", "optimizer" (AdamW state dict), "positions" (one data position per rank,
                     `TrainStream.position()`), "rng" (per rank: torch CPU RNG state, CUDA RNG state or
                     None), "world"}: tensors, numbers, strings, lists and dicts only, so
                     `torch.load(path, weights_only=True)` reads it
  config.yaml        the resolved TrainConfig
`runs/NAME/checkpoints/last` then names the directory (written last: a crash leaves the previous one).
Every file is written as `.NAME.tmp-PID` and renamed into place; a save that fails removes what it
half-wrote, and `remove_stale_tmp` removes what a killed process left.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import read_last, save_head, write_last
from regionspot.models.head import RegionSpotHead
from regionspot.shards.locks import process_alive

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}"


def rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def save_checkpoint(
    run: Path,
    step: int,
    head: RegionSpotHead,
    optimizer: torch.optim.Optimizer,
    positions: list[dict],
    rngs: list[dict],
    config: dict,
    fingerprint: str,
) -> Path:
    """Write `checkpoints/step-NNNNNNN/` (on rank 0) and point `last` at it; returns the directory.

    Raises RegionSpotError naming the directory when the disk is full; then, as after any failure, the
    files this save half-wrote are gone (a step directory it created too) and `last` still names the
    previous checkpoint.
    """
    directory = step_dir(run, step)
    created = not directory.exists()
    try:
        save_head(head, directory, fingerprint, {"step": step})
        state = {
            "step": step,
            "world": len(positions),
            "optimizer": optimizer.state_dict(),
            "positions": positions,
            "rng": rngs,
        }
        # serialised in memory, then written by Python: a full disk is then an OSError (ENOSPC), where
        # torch.save to a path reports only "[enforce fail at inline_container.cc] unexpected pos"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_bytes(buffer.getbuffer())
        os.replace(tmp, directory / STATE_FILE)
        write_config(directory / CONFIG_FILE, config)
        write_last(directory.parent, directory)
    except BaseException as e:
        remove_stale_tmp(run, also=os.getpid())
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(e, Exception) and _no_space(e):
            last = last_checkpoint(run)
            raise RegionSpotError(
                f"{directory.parent}: no space left on device while saving step {step}; its half-written "
                f"files are removed and the finished checkpoints are intact (last: "
                f"{last.name if last else 'none'}); free some space and continue with --resume"
            ) from e
        raise
    return directory


def _no_space(e: Exception) -> bool:
    """Whether `e` says the disk (or the quota) is full: an OSError, or safetensors' error text."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, OSError) and e.errno in codes:
        return True
    return any(os.strerror(code) in str(e) for code in codes)


_TMP = re.compile(r"\.tmp-(\d+)$")


def remove_stale_tmp(run: Path, also: int | None = None) -> list[Path]:
    """Remove the `.NAME.tmp-PID` files in a run folder whose process is gone (a killed save), and
    those of process `also` (this one, after a failed save); returns what was removed.

    A temporary file of a live process (another run writing here) is left alone; a step directory
    left empty is removed.
    """
    run = Path(run)
    steps = sorted(p for p in (run / "checkpoints").glob("step-*") if p.is_dir())
    removed = []
    for folder in [run, run / "checkpoints", *steps]:
        for path in folder.glob(".*.tmp-*"):
            match = _TMP.search(path.name)
            if match and (int(match[1]) == also or not process_alive(int(match[1]))):
                path.unlink(missing_ok=True)
                removed.append(path)
    for folder in steps:
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def last_checkpoint(run: Path) -> Path | None:
    """The step directory `run/checkpoints/last` names, or None for a new run."""
    return read_last(Path(run) / "checkpoints")


def load_state(directory: Path) -> dict:
    """trainer_state.pt of a step directory, read with weights_only=True."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise RegionSpotError(
            f"{directory} has no {STATE_FILE} (a converted or hand-made checkpoint?); it can start a run with "
            "--init but not be resumed"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegionSpotError(
            f"{path}: unreadable ({type(e).__name__}: {e}); resume from an earlier step"
        ) from e
