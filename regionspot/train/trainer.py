"""`run_train`: fit the fusion head from shards — no backbone in the loop.

    shard sets --TrainStream--> (dataset d, padded Batch) --head--> logits [B, N, K] vs d's vocabulary
    --focal loss--> AdamW (warm-up, step decay, grad clip) --> checkpoints/step-N, metrics, TensorBoard

Writes to the run folder (`cfg.out`): config.yaml, checkpoints/step-NNNNNNN/ (head.safetensors,
trainer_state.pt, config.yaml) and checkpoints/last, tensorboard/, metrics.jsonl. Everything that can
be refused (shard sets, fingerprints, --init, an existing run) is refused before the first step.
A step does not wait for the device: the loss and the non-finite check are read back every
`log_every` steps and at checkpoints (`StepMonitor`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import load_head
from regionspot.models.head import RegionSpotHead
from regionspot.models.scoring import best_token_logits
from regionspot.shards.location import Location
from regionspot.shards.manifest import MANIFEST
from regionspot.shards.shardset import ShardSet, check_mixable, find_shardsets
from regionspot.train.config import TrainConfig
from regionspot.train.distributed import Dist
from regionspot.train.logs import TrainLog
from regionspot.train.loss import region_focal_loss
from regionspot.train.monitor import StepMonitor
from regionspot.train.state import (
    CONFIG_FILE,
    last_checkpoint,
    load_state,
    remove_stale_tmp,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dir,
    write_config,
)
from regionspot.train.stream import TrainStream


def open_shard_sets(paths: list[Path | str], storage_options: dict | None = None) -> list[ShardSet]:
    """The shard sets named directly or found one level down in a folder of sets (sorted by name);
    each a directory or a URL (read with `storage_options`).

    Raises RegionSpotError for a folder without shard sets, an empty set, a set without regions, or
    sets whose backbones fingerprints differ (naming the differing fields).
    """
    sets = []
    for p in paths:
        where = Location.parse(p, storage_options)
        found = [] if where.exists(MANIFEST) else find_shardsets(where, depth=1)
        # a folder without sets is read as a set: it raises "no shards in P; run 'regionspot extract' first"
        sets += [ShardSet(q) for q in found] if found else [ShardSet(where)]
    check_mixable(sets)
    for s in sets:
        if s.num_regions == 0:
            raise RegionSpotError(
                f"{s.path}: the shard set holds no regions to train on; extract a set with boxes"
            )
    return sets


def lr_at(step: int, cfg: TrainConfig) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from lr * warmup_factor, then lr / 10 at each drop."""
    factor = cfg.lr_drop_factor ** sum(step >= s for s in cfg.lr_drop_steps)
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return cfg.lr * factor


def _head_config(cfg: TrainConfig, shards: ShardSet) -> dict:
    clip = shards.backbones["clip"]
    return dict(
        clip_width=int(clip["width"]),
        embed_dim=int(clip["embed_dim"]),
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        ff_dim=cfg.ff_dim,
        dropout=cfg.dropout,
        logit_scale=shards.logit_scale,
    )


def _init_head(path: Path, shards: ShardSet, config: dict) -> RegionSpotHead:
    """The --init head, refused when it belongs to other backbones or another feature width."""
    head, fingerprint, _ = load_head(path, fingerprint_if_imported=shards.fingerprint)
    if fingerprint and fingerprint != shards.fingerprint:
        shards.check_fingerprint(fingerprint, against=f"--init {path}")
    got = head.config()
    for key in ("clip_width", "embed_dim", "sam_dim"):
        if key in config and got[key] != config[key]:
            raise RegionSpotError(
                f"--init {path}: a head for {key} {got[key]}, the shards have {config[key]}; "
                "initialise from a head trained on the same backbones"
            )
    # the architecture is the checkpoint's; dropout and the logit scale are this run's
    config.update({k: got[k] for k in ("num_layers", "num_heads", "ff_dim", "sam_dim")})
    return head


def run_train(cfg: TrainConfig) -> Path:
    """Train the head as `cfg` says; returns the run folder. Data-parallel when launched by torchrun."""
    cfg.check()
    env = Dist.from_env()
    if cfg.batch_size % env.world:
        raise RegionSpotError(
            f"--batch-size {cfg.batch_size} does not split over {env.world} ranks; use a multiple"
        )
    sets = open_shard_sets(cfg.shards, cfg.storage_options)
    if cfg.mix_weights is not None and len(cfg.mix_weights) != len(sets):
        raise RegionSpotError(
            f"mix_weights has {len(cfg.mix_weights)} values for {len(sets)} shard sets "
            f"({', '.join(s.path.name for s in sets)})"
        )
    run, fingerprint = Path(cfg.out), sets[0].fingerprint
    resume_dir = last_checkpoint(run)
    if resume_dir is not None and not cfg.resume:
        raise RegionSpotError(
            f"{run} already holds a run (last: {resume_dir.name}); pass --resume to continue it, or another --out"
        )
    config = _head_config(cfg, sets[0])
    init = _init_head(cfg.init, sets[0], config) if cfg.init is not None else None
    state = None
    if cfg.resume and resume_dir is not None:
        state = load_state(resume_dir)
        resumed, saved_fp, _ = load_head(resume_dir)
        if saved_fp != fingerprint:
            sets[0].check_fingerprint(saved_fp or "", against=f"the run in {run}")
        config = resumed.config()
        if state.get("world") != env.world:
            raise RegionSpotError(
                f"{resume_dir} was trained on {state.get('world')} rank(s), now {env.world}; resume with the same --gpus"
            )
    for s in sets:
        if s.text_embeddings().shape[1] != config["embed_dim"]:
            raise RegionSpotError(
                f"{s.path}: text embeddings of width {s.text_embeddings().shape[1]}, the head embeds to {config['embed_dim']}"
            )

    device = torch.device("cpu") if cfg.gpus == 0 else env.device()
    env.init(device)
    torch.manual_seed(cfg.seed)  # the same initial head on every rank and in every run of this config
    head = RegionSpotHead(**config)
    if init is not None:
        head.load_state_dict(init.state_dict())
    if state is not None:
        head.load_state_dict(resumed.state_dict())
    head.to(device)
    # fused: the only AdamW that skips a step on the device (`found_inf`, see StepMonitor)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start, position = 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["fused"] = True  # a checkpoint's own setting (earlier versions: unfused) would win
        start, position = int(state["step"]), state["positions"][env.rank]
        set_rng_state(state["rng"][env.rank])
    else:
        torch.manual_seed(cfg.seed * 7919 + env.rank)  # dropout differs between ranks
    model = head
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None
        )
    texts = [torch.from_numpy(s.text_embeddings()).to(device) for s in sets]  # (K_d, D) per dataset
    stream = TrainStream(
        sets,
        cfg.batch_size // env.world,
        env.rank,
        env.world,
        workers=cfg.workers,
        seed=cfg.seed,
        weights=cfg.mix_weights,
        buffer=cfg.shuffle_buffer,
        shuffle_labels=cfg.shuffle_labels,
        position=position,
        pin_memory=device.type == "cuda",
        prefetch=cfg.prefetch,
        max_regions=cfg.max_regions,
        history=cfg.log_every,
        verify=cfg.verify_reads,
    )
    resolved = cfg.to_json() | {"head": config, "fingerprint": fingerprint, "world": env.world}
    if env.main:
        remove_stale_tmp(run)  # left by a killed save
        write_config(run / CONFIG_FILE, resolved)
    log = TrainLog(run, env.main, cfg.steps, start, cfg.log_every)
    monitor = StepMonitor(device, cfg.log_every)

    def save(step: int, back: int = 0, rng: dict | None = None) -> None:
        """Checkpoint `step` with the data position `back` batches ago and `rng` (default: now)."""
        positions = env.gather(stream.position(back))
        rngs = env.gather(rng if rng is not None else rng_state())
        error = None
        if env.main:
            try:
                save_checkpoint(run, step, head, optimizer, positions, rngs, resolved, fingerprint)
            except Exception as e:  # every rank stops, none waits for rank 0 forever
                error = e
        if not env.all_true(error is None, device):
            raise error or RegionSpotError(
                f"rank 0 could not save {step_dir(run, step)}; its message says why"
            )

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    try:
        for step in range(start, cfg.steps):
            d, batch = next(stream)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            samples, regions = len(batch) * env.world, int(batch.region_mask.sum()) * env.world  # on the host
            monitor.begin(step, batch.keys)
            batch = batch.to(device, non_blocking=True)  # float16 features over the bus ...
            tokens = batch.sam_tokens.float()  # ... float32 on the device: (B, N, T, 256)
            if tokens.shape[2] == 1:
                tokens = tokens[:, :, 0]  # (B, N, 256)
            with autocast:
                logits = model(tokens, batch.clip_map.float(), texts[d], batch.region_mask)  # (B, N, [T,] K)
            if logits.dim() == 4:
                logits = best_token_logits(
                    logits.float(), batch.sam_iou
                )  # (B, N, K): the token SAM rates best
            loss = region_focal_loss(
                logits, batch.labels, batch.region_mask, cfg.focal_alpha, cfg.focal_gamma
            )
            optimizer.zero_grad(set_to_none=True)
            monitor.loss_for_backward(loss).backward()
            # the norm is also the non-finite check (of the gradient all ranks share); no clip: max inf
            norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip or math.inf)
            optimizer.found_inf = monitor.found_inf(norm)
            optimizer.step()
            done = step + 1
            logged = done % cfg.log_every == 0 or done == cfg.steps
            saved = done % cfg.save_every == 0 or done == cfg.steps
            mean = None
            if logged or saved:
                mean, bad = monitor.read(env, reset=logged)
                if bad:
                    _stop_non_finite(env, save, monitor, done, run)
            log.step(done, mean if logged else None, lr, samples, regions)
            if saved:
                save(done)
    finally:
        stream.close()
        log.close()
    return run


def _stop_non_finite(env: Dist, save, monitor: StepMonitor, done: int, run: Path) -> None:
    """Save the state before the first non-finite step (the last good one: no update since), then stop
    naming that step and its images. `done`: the steps taken so far."""
    reports = env.gather(monitor.report())
    step = min(first for first, _ in reports if first is not None)
    save(step, back=done - step, rng=monitor.rng_before(step))
    at_step = [
        (rank, keys, loss)
        for rank, (_, recent) in enumerate(reports)
        for s, keys, loss in recent
        if s == step
    ]
    culprits = [r for r in at_step if not math.isfinite(r[2])]
    rank, keys, loss = (culprits or at_step)[0]
    what = f"loss is {loss}" if culprits else "the gradient is not finite"
    shown = ", ".join(map(str, keys[:8])) + (", ..." if len(keys) > 8 else "")
    raise RegionSpotError(
        f"{what} at step {step} (rank {rank}, images {shown}); the last good state is saved as "
        f"{step_dir(run, step)}; check these samples (regionspot shards verify) or lower --lr"
    )
