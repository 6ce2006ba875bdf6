"""Shards -> padded batches: what training and evaluation feed the head.

A batch pads each image's regions to the batch's largest count and marks real regions in
`region_mask`; padded rows are zeros with label -1 (no repeated boxes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import FEATURE_DTYPE, SAM_DIM, STORED_DTYPES, Sample
from regionspot.shards.shardset import ShardSet
from regionspot.shards.storage import iter_shard, read_shard

TORCH_FEATURE_DTYPE: torch.dtype = getattr(torch, FEATURE_DTYPE.name)  # the stored features, in torch

@dataclass
class Batch:
    """B images padded to N regions (N = the batch's largest region count, may be 0)."""

    keys: list[str]
    image_ids: list
    sizes: list[tuple[int, int]]  # (width, height) of the original images
    sam_tokens: torch.Tensor  # (B, N, T, 256)
    sam_iou: torch.Tensor  # (B, N, T)
    clip_map: torch.Tensor  # (B, L, C)
    region_mask: torch.Tensor  # (B, N) bool, True = real region
    labels: torch.Tensor  # (B, N) int64, -1 = padding or unknown
    boxes: torch.Tensor  # (B, N, 4) XYXY pixels
    scores: torch.Tensor  # (B, N)

    def _map(self, fn) -> Batch:
        return Batch(
            **{
                f.name: fn(getattr(self, f.name))
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
                for f in fields(self)
            }
        )

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Batch:
        """Move to `device`; the stored-precision features (sam_tokens, sam_iou, clip_map) become `dtype`
        when given. Boxes and scores stay float32 (pixel coordinates need the precision)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.dtype == TORCH_FEATURE_DTYPE:
                return t.to(device, dtype, non_blocking=non_blocking)
            return t.to(device, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def __len__(self) -> int:
        return len(self.keys)


def read_shard_samples(path: Path | str, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples of one shard file from index `start` on, in stored order (a training stream's unit).

    Samples before `start` are skipped without being decoded, so resuming at (shard, offset) is cheap.
    Arrays keep their stored dtypes (float16 features); `collate` pads them into a `Batch`.
    """
    return read_shard(Path(path), start, stop)


def collate(samples: list[Sample]) -> Batch:
    """Pad samples into one `Batch`; features stay float16 until `Batch.to(dtype=...)`.

    Args:
        samples: B samples with one token count T and one CLIP map shape [L, C]; any may have N_i = 0.
    Returns:
        Batch with N = max N_i (0 when no sample has a region): real regions first in each row,
        `region_mask` True on them, padded rows zero with label -1. One copy per field.
    """
    b = len(samples)
    n = max((s.num_regions for s in samples), default=0)
    t = samples[0].sam_tokens.shape[1] if samples else 1
    clip_shape = samples[0].clip_map.shape if samples else (0, 0)
    for s in samples:
        if s.sam_tokens.shape[1] != t or s.clip_map.shape != clip_shape:
            raise RegionSpotError(
                f"cannot batch sample {s.key!r} (T={s.sam_tokens.shape[1]}, clip map {list(s.clip_map.shape)}) "
                f"with {samples[0].key!r} (T={t}, clip map {list(clip_shape)}): samples from other backbones"
            )
    tokens = np.zeros((b, n, t, SAM_DIM), STORED_DTYPES["sam_tokens"])  # (B, N, T, 256)
    iou = np.zeros((b, n, t), STORED_DTYPES["sam_iou"])  # (B, N, T)
    boxes = np.zeros((b, n, 4), STORED_DTYPES["boxes"])  # (B, N, 4)
    scores = np.zeros((b, n), STORED_DTYPES["scores"])
    labels = np.full((b, n), -1, np.int64)
    mask = np.zeros((b, n), bool)
    for i, s in enumerate(samples):
        k = s.num_regions
        tokens[i, :k], iou[i, :k], boxes[i, :k] = s.sam_tokens, s.sam_iou, s.boxes
        scores[i, :k], labels[i, :k], mask[i, :k] = s.scores, s.labels, True
    clip = np.stack([s.clip_map for s in samples]) if samples else np.zeros((0, *clip_shape), FEATURE_DTYPE)
    return Batch(
        keys=[s.key for s in samples],
        image_ids=[s.image_id for s in samples],
        sizes=[(s.width, s.height) for s in samples],
        sam_tokens=torch.from_numpy(tokens),
        sam_iou=torch.from_numpy(iou),
        clip_map=torch.from_numpy(clip),  # (B, L, C)
        region_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        boxes=torch.from_numpy(boxes),
        scores=torch.from_numpy(scores),
    )


def batch_plan(shards: ShardSet, batch_size: int) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) of every batch of the set in manifest order; no batch spans two shards
    (the last batch of a shard may be short)."""
    if batch_size < 1:
        raise RegionSpotError(f"batch size {batch_size}: must be at least 1")
    return [
        (i, a, min(a + batch_size, n))
        for i, n in enumerate(shards.shard_samples)
        for a in range(0, n, batch_size)
    ]


class _Ordered(torch.utils.data.IterableDataset):
    """Batches of a shard set in manifest order. Batch j goes to worker j mod W, and the DataLoader
    takes one batch from each worker in turn, so the stream stays in manifest order with any W.
    A worker reads each shard once, skipping (undecoded) the samples of other workers' batches."""

    def __init__(self, shards: ShardSet, batch_size: int):
        self.shards, self.batch_size = shards, batch_size
        self.plan = batch_plan(shards, batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine: dict[int, set[int]] = {}  # shard -> starts of my batches
        for j, (i, a, _) in enumerate(self.plan):
            if j % workers == w:
                mine.setdefault(i, set()).add(a)
        bs = self.batch_size
        for i in sorted(mine):
            starts = mine[i]
            pending: list[Sample] = []
            current = None  # start of the batch being filled

            def keep(k: int, starts=starts) -> bool:  # is sample k in one of my batches?
                return k - k % bs in starts

            for k, sample in iter_shard(self.shards.shard_paths[i], min(starts), keep=keep):
                if k - k % bs != current and pending:
                    yield collate(pending), pending
                    pending = []
                current = k - k % bs
                pending.append(sample)
            if pending:
                yield collate(pending), pending


def iter_batches(
    shards: ShardSet, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Batch, list[Sample]]]:
    """(Batch, its samples) over the whole set in manifest order, for evaluation.

    Args:
        shards: the shard set.
        batch_size: images per batch; a batch never spans two shards, so a shard's last one may be short.
        num_workers: DataLoader worker processes reading shards in parallel (order is kept).
    """
    dataset = _Ordered(shards, batch_size)
    if num_workers == 0:
        yield from dataset
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4)
    yield from loader
