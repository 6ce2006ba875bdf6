"""The batched extraction loop of one process: decode in DataLoader workers, SAM + CLIP on the device,
samples to the shard sink.

Stream: ImageRecord (key order) -> worker: decoded + resized image pair -> device: SAM image
embeddings, region tokens, CLIP map -> float16 `Sample` -> sink thread -> shard files.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from regionspot.data.images import ImageDecodeError, SizeMismatch, load_record_image
from regionspot.data.records import ImageRecord
from regionspot.extract.partition import shard_range
from regionspot.extract.sink import ShardSink
from regionspot.shards.schema import STORED_DTYPES, Sample


@dataclass
class Decoded:
    position: int
    sam_image: torch.Tensor | None  # uint8 [3, h', w'], longest side = SAM's input size
    clip_image: torch.Tensor | None  # float32 [3, S, S], normalised
    error: str | None = None


class DecodedImages(Dataset):
    """Decodes and resizes the images of `records`; an image that cannot be used (corrupt, outside
    the image folder, not the annotated size) becomes a `Decoded` with `error`, the reason."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        sam_prepare: Callable,
        clip_prepare: Callable,
        size_mismatch: SizeMismatch = "skip",
    ):
        self.records, self.sam_prepare, self.clip_prepare = records, sam_prepare, clip_prepare
        self.size_mismatch = size_mismatch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> Decoded:
        try:
            image = load_record_image(self.records[position], self.size_mismatch)
        except ImageDecodeError as e:
            return Decoded(position, None, None, str(e))
        return Decoded(position, self.sam_prepare(image), self.clip_prepare(image))


def shard_batches(shards: Sequence[int], shard_size: int, num_images: int, batch_size: int) -> list[list[int]]:
    """Index lists in key order; a batch never spans two shards, so a shard's bytes never depend on
    where a run started."""
    batches = []
    for index in shards:
        positions = shard_range(index, shard_size, num_images)
        batches += [list(positions[i : i + batch_size]) for i in range(0, len(positions), batch_size)]
    return batches


class Timer:
    """Wall time per phase; synchronises the device so a phase is charged for its own kernels."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, defaultdict(float)

    def mark(self, phase: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - start
        return now


def _to_sample(record: ImageRecord, tokens, clip_map: torch.Tensor) -> Sample:
    return Sample(
        key=record.key,
        image_id=record.image_id,
        file_name=record.file_name,
        width=int(record.width),
        height=int(record.height),
        boxes=record.boxes.astype(STORED_DTYPES["boxes"]),
        labels=record.labels.astype(STORED_DTYPES["labels"]),
        scores=record.scores.astype(STORED_DTYPES["scores"]),
        sam_tokens=tokens.tokens.float().cpu().numpy().astype(STORED_DTYPES["sam_tokens"]),
        sam_iou=tokens.iou.float().cpu().numpy().astype(STORED_DTYPES["sam_iou"]),
        clip_map=clip_map.float().cpu().numpy().astype(STORED_DTYPES["clip_map"]),
        masks=tokens.masks,
    )


def extract_shards(
    records: Sequence[ImageRecord],
    shards: Sequence[int],
    shard_size: int,
    backbones,
    sink: ShardSink,
    *,
    batch_size: int,
    num_workers: int,
    masks: bool,
    device: torch.device,
    on_batch: Callable[[int, int], None] = lambda images, regions: None,
    size_mismatch: SizeMismatch = "skip",
) -> dict[str, float]:
    """Extract the given shards of `records` into `sink`; returns seconds per phase.

    size_mismatch: for an image whose size is not its annotation's, see `load_record_image`.
    """
    sam, clip = backbones.sam, backbones.clip
    batches = shard_batches(shards, shard_size, len(records), batch_size)
    loader = DataLoader(
        DecodedImages(records, sam.prepare, clip.prepare, size_mismatch),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    timer = Timer(device)
    current_shard = None
    start = time.perf_counter()
    for batch in loader:
        start = timer.mark("decode", start)
        shard = batch[0].position // shard_size
        if shard != current_shard:
            if current_shard is not None:
                sink.end()
            sink.begin(shard)
            current_shard = shard
        good = [d for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                sink.skip(records[d.position].key, d.error)
        regions = 0
        if good:
            batch_records = [records[d.position] for d in good]
            embeddings = sam.encode([d.sam_image.to(device, non_blocking=True) for d in good])
            start = timer.mark("sam_encoder", start)
            boxes = [torch.from_numpy(r.boxes).to(device) for r in batch_records]
            sizes = [(r.height, r.width) for r in batch_records]
            tokens = sam.region_tokens(embeddings, boxes, sizes, masks=masks)
            start = timer.mark("sam_decoder", start)
            clip_maps = clip.feature_map(torch.stack([d.clip_image for d in good]).to(device, non_blocking=True))
            start = timer.mark("clip", start)
            for record, region_tokens, clip_map in zip(batch_records, tokens, clip_maps, strict=True):
                sink.write(_to_sample(record, region_tokens, clip_map))
            regions = sum(len(r.boxes) for r in batch_records)
            start = timer.mark("handoff", start)
        on_batch(len(batch), regions)
        # the last batch of every shard closes it, so a killed run loses at most the shard in flight
        if batch[-1].position == shard_range(shard, shard_size, len(records))[-1]:
            sink.end()
            current_shard = None
    return dict(timer.seconds)


def count_regions(records: Sequence[ImageRecord]) -> int:
    # labels, not boxes: an OpenImages record reads its image header for pixel boxes on first access
    return int(np.sum([len(r.labels) for r in records])) if records else 0
