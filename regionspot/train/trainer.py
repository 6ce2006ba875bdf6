"""`run_train`: fit the fusion head from shards — no backbone in the loop.

    shard sets --TrainStream--> (dataset d, padded Batch) --head--> logits [B, N, K] vs d's vocabulary
    --focal loss--> AdamW (warm-up, step decay, grad clip) --> checkpoints/step-N, metrics, TensorBoard

Writes to the run folder (`cfg.out`): config.yaml, checkpoints/step-NNNNNNN/ (head.safetensors,
trainer_state.pt, config.yaml) and checkpoints/last, tensorboard/, metrics.jsonl. Everything that can
be refused (shard sets, fingerprints, --init, an existing run) is refused before the first step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import load_head
from regionspot.models.head import RegionSpotHead
from regionspot.models.scoring import best_token_logits
from regionspot.shards.manifest import MANIFEST
from regionspot.shards.shardset import ShardSet, check_mixable
from regionspot.train.config import TrainConfig
from regionspot.train.distributed import Dist
from regionspot.train.logs import TrainLog
from regionspot.train.loss import region_focal_loss
from regionspot.train.state import (
    CONFIG_FILE,
    last_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dir,
    write_config,
)
from regionspot.train.stream import TrainStream


def open_shard_sets(paths: list[Path]) -> list[ShardSet]:
    """The shard sets named directly or found one level down in a folder of sets (sorted by name).

    Raises RegionSpotError for a folder without shard sets, an empty set, a set without regions, or
    sets whose backbones fingerprints differ (naming the differing fields).
    """
    sets = []
    for p in map(Path, paths):
        found = sorted(q.parent for q in p.glob(f"*/{MANIFEST}")) if p.is_dir() else []
        if (p / MANIFEST).exists() or not found:
            sets.append(ShardSet(p))  # raises "no shards in P; run 'regionspot extract' first"
        else:
            sets += [ShardSet(q) for q in found]
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
    sets = open_shard_sets(cfg.shards)
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
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, position = 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
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
        verify=cfg.verify_reads,
    )
    resolved = cfg.to_json() | {"head": config, "fingerprint": fingerprint, "world": env.world}
    if env.main:
        write_config(run / CONFIG_FILE, resolved)
    log = TrainLog(run, env.main, cfg.steps, start, cfg.log_every)

    def save(step: int, before_last_batch: bool = False) -> None:
        positions = env.gather(stream.position(before_last=before_last_batch))
        rngs = env.gather(rng_state())
        if env.main:
            save_checkpoint(run, step, head, optimizer, positions, rngs, resolved, fingerprint)
        env.barrier()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    try:
        for step in range(start, cfg.steps):
            d, batch = next(stream)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
            value = loss.item()
            if not env.all_true(math.isfinite(value), device):
                _stop_non_finite(env, save, step, value, batch.keys, run)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            optimizer.step()
            log.step(step + 1, value, lr, len(batch) * env.world, int(batch.region_mask.sum()) * env.world)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
    finally:
        stream.close()
        log.close()
    return run


def _stop_non_finite(env: Dist, save, step: int, value: float, keys: list[str], run: Path) -> None:
    """Save the state before this step (the last good one) on every rank, then stop naming the images."""
    reports = env.gather((value, list(keys)))
    save(step, before_last_batch=True)
    bad = [(r, v, k) for r, (v, k) in enumerate(reports) if not math.isfinite(v)]
    rank, v, bad_keys = bad[0] if bad else (env.rank, value, keys)
    shown = ", ".join(map(str, bad_keys[:8])) + (", ..." if len(bad_keys) > 8 else "")
    raise RegionSpotError(
        f"loss is {v} at step {step} (rank {rank}, images {shown}); the last good state is saved as "
        f"{step_dir(run, step)}; check these samples (regionspot shards verify) or lower --lr"
    )
