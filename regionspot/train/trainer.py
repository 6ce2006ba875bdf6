"""`run_train`: fit the fusion head from shards — no backbone in the loop.

Writes to the run folder (`--out`): `checkpoints/step-NNNNNNN/` (head.safetensors, trainer_state.pt,
config.yaml) and `checkpoints/last`, TensorBoard events, and `metrics.jsonl` (one JSON object per
logged step: step, loss, lr, samples_per_s).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import LAST, load_head, resolve_checkpoint, save_head, write_last
from regionspot.models.head import RegionSpotHead
from regionspot.models.scoring import best_token_logits
from regionspot.shards.shardset import ShardSet
from regionspot.train.config import TrainConfig
from regionspot.train.loss import region_focal_loss
from regionspot.train.stream import MixedStream, prefetch

STATE_FILE = "trainer_state.pt"


def open_shard_sets(paths: list[Path]) -> list[ShardSet]:
    """Shard sets named directly or found one level down in a folder of sets; fingerprints must agree."""
    sets = []
    for p in map(Path, paths):
        if (p / "manifest.json").exists() or not p.is_dir():
            sets.append(ShardSet(p))
            continue
        found = sorted(q.parent for q in p.glob("*/manifest.json"))
        if not found:
            raise RegionSpotError(f"no shards in {p}; run 'regionspot extract' first")
        sets += [ShardSet(q) for q in found]
    for s in sets:
        if s.num_regions == 0:
            raise RegionSpotError(f"{s.path} holds no regions to train on")
        s.check_fingerprint(sets[0].fingerprint, against=f"{sets[0].path}", backbones=sets[0].backbones)
    return sets


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cfg.lr_drop_factor ** sum(step >= s for s in cfg.lr_drop_steps)


def _step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def run_train(cfg: TrainConfig) -> Path:
    """Train the head as `cfg` says; returns the run folder. Distributed when launched by torchrun."""
    cfg.check()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if cfg.batch_size % world:
        raise RegionSpotError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    sets = open_shard_sets(cfg.shards)
    if cfg.mix_weights is not None and len(cfg.mix_weights) != len(sets):
        raise RegionSpotError(f"--mix-weights has {len(cfg.mix_weights)} values for {len(sets)} shard sets")
    texts = [torch.from_numpy(s.text_embeddings()).to(device) for s in sets]
    clip = sets[0].backbones["clip"]
    torch.manual_seed(cfg.seed)  # the same initial head on every rank and in every run of this config
    head = RegionSpotHead(
        clip["width"], clip["embed_dim"], dropout=cfg.dropout, logit_scale=sets[0].logit_scale
    )
    run = Path(cfg.out)
    last = run / "checkpoints" / LAST
    if last.exists() and not cfg.resume:
        raise RegionSpotError(f"{run} already holds a run; pass --resume to continue it, or another --out")
    if cfg.init is not None:
        init, fingerprint, imported = load_head(cfg.init, sets[0].fingerprint)
        if not imported:
            sets[0].check_fingerprint(fingerprint, against=f"--init {cfg.init}")
        head.load_state_dict(init.state_dict())
    head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start, stream_state = 0, None
    if cfg.resume and last.exists():
        step_dir = resolve_checkpoint(last).parent
        resumed, _, _ = load_head(step_dir)
        head.load_state_dict(resumed.state_dict())
        state = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, stream_state = state["step"], state["streams"][rank]
        torch.set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(cfg.seed + rank)
    model = head
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        model = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None
        )
    stream = MixedStream(
        sets,
        cfg.batch_size // world,
        rank,
        world,
        cfg.seed,
        cfg.mix_weights,
        cfg.shuffle_labels,
        stream_state,
        open_shards=cfg.workers,
    )
    main = rank == 0
    if main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_json(), sort_keys=False))
    logger = _Logger(run, main, cfg, start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    batches = prefetch(stream, pin=device.type == "cuda")
    state_after = stream_state
    try:
        for step in range(start, cfg.steps):
            d, batch, next_state = next(batches)
            batch = batch.to(device, dtype=torch.float32, non_blocking=True)
            with autocast:
                logits = model(batch.sam_tokens, batch.clip_map, texts[d], batch.region_mask)  # (B, N, T, K)
            if logits.dim() == 4:
                logits = best_token_logits(logits.float(), batch.sam_iou)
            loss = region_focal_loss(
                logits.float(), batch.labels, batch.region_mask, cfg.focal_alpha, cfg.focal_gamma
            )
            if not torch.isfinite(loss):
                _save(run, step, head, optimizer, scheduler, state_after, cfg, world, sets[0].fingerprint)
                raise RegionSpotError(
                    f"loss is {loss.item()} at step {step} (images {', '.join(batch.keys[:8])}); the last good state "
                    f"is saved as {_step_dir(run, step).name}; lower --lr or check these samples"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state_after = next_state
            logger.step(
                step + 1,
                loss.item(),
                scheduler.get_last_lr()[0],
                len(batch) * world,
                int(batch.region_mask.sum()),
            )
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save(run, step + 1, head, optimizer, scheduler, state_after, cfg, world, sets[0].fingerprint)
    finally:
        batches.close()
        logger.close()
    return run


def _save(run, step, head, optimizer, scheduler, stream_state, cfg, world, fingerprint) -> None:
    """A checkpoint every rank can resume from; rank 0 writes it."""
    states, rngs = [stream_state], [torch.get_rng_state()]
    if world > 1:
        states, rngs = [None] * world, [None] * world
        dist.all_gather_object(states, stream_state)
        dist.all_gather_object(rngs, torch.get_rng_state())
    if int(os.environ.get("RANK", "0")) != 0:
        return
    step_dir = _step_dir(run, step)
    save_head(head, step_dir, fingerprint)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "streams": states,
        "rng": rngs,
    }
    tmp = step_dir / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, step_dir / STATE_FILE)
    (step_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_json(), sort_keys=False))
    write_last(run / "checkpoints", step_dir)


class _Logger:
    """Progress bar, TensorBoard and metrics.jsonl on rank 0."""

    def __init__(self, run: Path, main: bool, cfg: TrainConfig, start: int):
        self.main, self.cfg = main, cfg
        self.t0, self.samples, self.regions = time.perf_counter(), 0, 0
        if not main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run / "tensorboard"))
        self.jsonl = open(run / "metrics.jsonl", "a")
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task("train", total=cfg.steps, completed=start, info="")
        self.progress.start()

    def step(self, step: int, loss: float, lr: float, samples: int, regions: int) -> None:
        self.samples += samples
        self.regions += regions
        if not self.main:
            return
        self.progress.update(self.task, completed=step)
        if step % self.cfg.log_every and step != self.cfg.steps:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        record = {"step": step, "loss": loss, "lr": lr, "samples_per_s": rate}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k in ("loss", "lr", "samples_per_s"):
            self.tb.add_scalar(f"train/{k}", record[k], step)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {rate:.0f} samples/s"
        self.progress.update(self.task, info=info if math.isfinite(loss) else f"loss {loss}")
        self.t0, self.samples = time.perf_counter(), 0

    def close(self) -> None:
        if self.main:
            self.progress.stop()
            self.tb.close()
            self.jsonl.close()
