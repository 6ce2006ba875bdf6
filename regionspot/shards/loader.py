"""Shards -> padded batches: what training and evaluation feed the head.

A batch pads each image's regions to the batch's largest count and marks real regions in
`region_mask`; padded rows are zeros with label -1 (no repeated boxes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from regionspot.shards.schema import SAM_DIM, Sample
from regionspot.shards.shardset import ShardSet


@dataclass
class Batch:
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
        """Move to `device`; floating feature tensors become `dtype` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device, dtype, non_blocking=non_blocking)
            return t.to(device, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def __len__(self) -> int:
        return len(self.keys)


def collate(samples: list[Sample]) -> Batch:
    """Pad a list of samples into one `Batch` (features stay float16)."""
    b = len(samples)
    n = max((s.num_regions for s in samples), default=0)
    t = next((s.sam_tokens.shape[1] for s in samples if s.sam_tokens.ndim == 3), 1)
    tokens = np.zeros((b, n, t, SAM_DIM), np.float16)
    iou = np.zeros((b, n, t), np.float16)
    boxes = np.zeros((b, n, 4), np.float32)
    scores = np.zeros((b, n), np.float32)
    labels = np.full((b, n), -1, np.int64)
    mask = np.zeros((b, n), bool)
    for i, s in enumerate(samples):
        k = s.num_regions
        tokens[i, :k], iou[i, :k], boxes[i, :k] = s.sam_tokens, s.sam_iou, s.boxes
        scores[i, :k], labels[i, :k], mask[i, :k] = s.scores, s.labels, True
    clip = np.stack([s.clip_map for s in samples]) if samples else np.zeros((0, 0, 0), np.float16)
    return Batch(
        keys=[s.key for s in samples],
        image_ids=[s.image_id for s in samples],
        sizes=[(s.width, s.height) for s in samples],
        sam_tokens=torch.from_numpy(tokens),
        sam_iou=torch.from_numpy(iou),
        clip_map=torch.from_numpy(clip),
        region_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        boxes=torch.from_numpy(boxes),
        scores=torch.from_numpy(scores),
    )


class _Ordered(torch.utils.data.IterableDataset):
    """Batches of a shard set in manifest order; worker w of W reads shards w, w+W, ... and the
    loader's round-robin restores the order as long as each shard fills whole batches."""

    def __init__(self, shards: ShardSet, batch_size: int):
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        indices = range(len(self.shards.shard_paths))
        if info is not None:
            indices = indices[info.id :: info.num_workers]
        for i in indices:
            pending: list[Sample] = []
            for sample in self.shards.iter_samples([i]):
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending), pending
                    pending = []
            if pending:
                yield collate(pending), pending


def iter_batches(
    shards: ShardSet, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Batch, list[Sample]]]:
    """(Batch, its samples) over the whole set; in manifest order with num_workers=0, else shard-interleaved."""
    if num_workers == 0:
        yield from _Ordered(shards, batch_size)
        return
    loader = torch.utils.data.DataLoader(
        _Ordered(shards, batch_size), batch_size=None, num_workers=num_workers, prefetch_factor=4
    )
    yield from loader
