"""`run_extract`: one extraction run — plan, partition, extract this process's shards, write the manifest.

How to read what it writes: `regionspot.shards.ShardSet(out)` (see DESIGN.md §4). Every file goes
through `regionspot.shards.writer.ShardSetWriter`: the run's identity first, then each shard with its
record; the text embeddings and the manifest once every shard is done, written by whichever process
finishes last (or by a re-run of the same command).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from regionspot.data.datasets import open_dataset
from regionspot.data.proposals import cap_boxes, load_proposals
from regionspot.data.records import ImageRecord
from regionspot.devices import resolve_device
from regionspot.errors import RegionSpotError
from regionspot.extract.config import ExtractConfig
from regionspot.extract.loop import count_regions, extract_shards
from regionspot.extract.partition import Partition, launcher_partition, num_shards, shards_of
from regionspot.extract.progress import ExtractProgress
from regionspot.extract.sink import ShardSink
from regionspot.models.clip import TEMPLATES_NAME
from regionspot.models.presets import load_backbones
from regionspot.shards.identity import run_identity
from regionspot.shards.writer import ShardSetWriter

log = logging.getLogger("regionspot.extract")


@dataclass
class Plan:
    """What a run extracts, the same in every process of the run."""

    cfg: ExtractConfig
    out: Path | str  # the shard set's directory, or its URL
    spec: object  # models.presets.BackboneSpec
    records: list[ImageRecord]
    vocabulary: list  # data.records.Category
    dataset: dict
    proposals: dict

    @property
    def total_shards(self) -> int:
        return num_shards(len(self.records), self.cfg.shard_size)

    @property
    def writer(self) -> ShardSetWriter:
        return ShardSetWriter(self.cfg.output(), self.cfg.storage)


def make_plan(cfg: ExtractConfig) -> Plan:
    """Check every option and read the annotations; no model is loaded."""
    cfg.check()
    spec = cfg.spec()
    reader = open_dataset(cfg.dataset, cfg.data_root, allow_outside_root=cfg.allow_outside_root)
    records = reader.records()
    if cfg.proposals is not None:
        proposals = load_proposals(cfg.proposals, reader)
        records = proposals.apply(records, max_boxes=cfg.max_boxes)
        proposals_info = {"source": str(cfg.proposals), "sha256": proposals.sha256, "stats": proposals.stats}
    else:
        if cfg.max_boxes is not None:
            records = [cap_boxes(r, cfg.max_boxes) for r in records]
        proposals_info = {"source": "gt"}
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise RegionSpotError(f"dataset {cfg.dataset!r} has no images to extract")
    dataset = {"name": reader.name, "sources": reader.sources, "stats": dict(reader.stats)}
    return Plan(cfg, cfg.output_dir(), spec, records, reader.vocabulary, dataset, proposals_info)


def identity(plan: Plan, backbones_info: dict) -> dict:
    """What makes two runs the same run: a directory holds the shards of one identity only."""
    cfg = plan.cfg
    return run_identity(
        dataset=plan.dataset["name"], sources=plan.dataset["sources"], proposals=plan.proposals,
        backbones=backbones_info, shard_size=cfg.shard_size, limit=cfg.limit, max_boxes=cfg.max_boxes,
        masks=cfg.masks, storage=cfg.storage,
    )  # fmt: skip


def run_extract(cfg: ExtractConfig) -> Path | str:
    """Extract `cfg.dataset` into a shard set and return its directory (or its URL, for a set in an
    object store: each shard is written locally, then uploaded before its record).

    Launched by torchrun or SLURM, this process extracts its rank's shards; otherwise the run
    starts one process per GPU (`--gpus`) or `--workers` CPU processes, and waits for them.
    """
    plan = make_plan(cfg)
    partition = launcher_partition()
    if partition is not None:
        if cfg.overwrite and partition.rank == 0:
            plan.writer.clear()
        _extract_partition(plan, partition, show_progress=partition.rank == 0)
        return plan.out
    if cfg.overwrite:
        plan.writer.clear()
    gpus = torch.cuda.device_count() if cfg.gpus is None else cfg.gpus
    world = gpus if gpus > 0 else (cfg.workers or 1)
    if world == 1:
        _extract_partition(plan, Partition(0, 1, external=False), show_progress=True)
    else:
        torch.multiprocessing.spawn(_spawned, args=(world, cfg), nprocs=world, join=True)
        _finish(plan)
    if not plan.writer.finished:
        raise RegionSpotError(
            f"extraction into {plan.writer.path} did not finish every shard; run the same command again"
        )
    return plan.out


def _spawned(rank: int, world: int, cfg: ExtractConfig) -> None:
    _extract_partition(make_plan(cfg), Partition(rank, world, external=False), show_progress=rank == 0)


def _device(plan: Plan, partition: Partition) -> torch.device:
    gpus = torch.cuda.device_count() if plan.cfg.gpus is None else plan.cfg.gpus
    # the launcher's local rank (torchrun: LOCAL_RANK; srun: SLURM_LOCALID); this run's own workers: rank
    local = os.environ.get("SLURM_LOCALID", 0) if partition.external else partition.rank
    local = int(os.environ.get("LOCAL_RANK", local))
    return resolve_device("cpu" if gpus == 0 else "auto", local_rank=local)


def _extract_partition(plan: Plan, partition: Partition, show_progress: bool) -> None:
    cfg = plan.cfg
    device = _device(plan, partition)
    if device.type == "cpu" and partition.world > 1 and not partition.external:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // partition.world))
    backbones = load_backbones(plan.spec, device=device, **cfg.runtime())
    writer = plan.writer
    writer.claim(identity(plan, backbones.info()))
    todo = [i for i in shards_of(partition, plan.total_shards) if not writer.is_complete(i)]
    # Another run of the same identity may be writing some of these (two commands into one --out):
    # this run takes the shards it can lock, then waits for the others' and does any whose owner died.
    held, busy = [], []
    for i in todo:
        lock = writer.lock(i)
        (held if lock is None or lock.acquire(blocking=False) else busy).append((i, lock))
    try:
        _extract_shards(plan, [i for i, _ in held], backbones, device, partition, show_progress)
    finally:
        for _, lock in held:
            if lock is not None:
                lock.release()
    for i, lock in busy:
        log.warning("shard %d is being written by another run (%s); waiting for it", i, lock.owner() or "?")
        with lock:
            if not writer.is_complete(i):  # its owner died: this run writes it
                _extract_shards(plan, [i], backbones, device, partition, show_progress)
    _finish(plan, backbones)


def _extract_shards(plan: Plan, todo: list[int], backbones, device, partition: Partition, show: bool) -> None:
    """Extract shards `todo` (this process may write them) with a progress bar and the time split."""
    if not todo:
        return
    cfg, writer = plan.cfg, plan.writer
    workers = (cfg.workers if cfg.workers is not None else 8) if device.type == "cuda" else 0
    positions = [p for i in todo for p in range(i * cfg.shard_size, min((i + 1) * cfg.shard_size, len(plan.records)))]
    progress = ExtractProgress(len(positions), count_regions([plan.records[p] for p in positions]), show)
    sink = ShardSink(writer)
    try:
        with progress:
            try:
                seconds = extract_shards(
                    plan.records, todo, cfg.shard_size, backbones, sink,
                    batch_size=cfg.batch_size or (32 if device.type == "cuda" else 8), num_workers=workers,
                    masks=cfg.masks, device=device, on_batch=progress.advance, size_mismatch=cfg.size_mismatch,
                )
            finally:
                sink.close()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise RegionSpotError(
            f"{writer.path}: no space left on device; the unfinished shard was removed and the finished ones "
            "are kept: free some space and run the same command again to continue"
        ) from None
    seconds["write (sink thread, overlapped)"] = sink.busy_seconds
    progress.report(seconds, rank=partition.rank if partition.world > 1 else None)


def _finish(plan: Plan, backbones=None) -> None:
    """Write text embeddings and the manifest once every shard of the run has its record."""

    def text_embeddings() -> np.ndarray:  # only when not written yet: may load CLIP for it
        nonlocal backbones
        if backbones is None:
            backbones = load_backbones(plan.spec, device=torch.device("cpu"))
        names = [c.name for c in plan.vocabulary]
        return torch.as_tensor(backbones.clip.text_embeddings(names)).float().cpu().numpy()

    wrote = plan.writer.finish(
        plan.total_shards, [c.to_json() for c in plan.vocabulary], text_embeddings, templates=TEMPLATES_NAME,
        extra={"dataset_stats": plan.dataset["stats"], "proposals": plan.proposals},
    )  # fmt: skip
    if wrote:
        log.info("finished the shard set %s", plan.writer.path)
