"""The batched extraction loop of one process: files read in DataLoader workers; decode, preprocessing,
SAM and CLIP on the device; samples to the shard sink.

Stream: ImageRecord (key order) -> worker: JPEG bytes + EXIF orientation, or an image decoded on the
CPU (`extract.decode`) -> device: uint8 [3, H, W] image -> SAM and CLIP inputs (`models.preprocess`)
-> region tokens, IoUs, CLIP map -> one float16 copy per batch to the host, overlapped with the next
batch's compute -> `Sample`s of numpy views into that copy -> sink thread -> shard files.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from regionspot.data.images import SizeMismatch
from regionspot.data.records import ImageRecord
from regionspot.extract.decode import ImageFiles, decode_images
from regionspot.extract.partition import shard_range
from regionspot.extract.sink import ShardSink
from regionspot.shards.schema import STORED_DTYPES, Sample

CPU_DECODED = "images decoded on the CPU"  # the count beside the seconds per phase
_COPIED = ("sam_tokens", "sam_iou", "clip_map")  # the device's outputs
_STORED = {name: torch.from_numpy(np.empty(0, STORED_DTYPES[name])).dtype for name in _COPIED}


def shard_batches(shards: Sequence[int], shard_size: int, num_images: int, batch_size: int) -> list[list[int]]:
    """Index lists in key order; a batch never spans two shards, so a shard's bytes never depend on
    where a run started."""
    batches = []
    for index in shards:
        positions = shard_range(index, shard_size, num_images)
        batches += [list(positions[i : i + batch_size]) for i in range(0, len(positions), batch_size)]
    return batches


class PhaseTimer:
    """Seconds per phase without stalling the device: on CUDA, events mark the phase boundaries on the
    stream and are read once passed (a phase is charged the stream time between its marks); on the
    CPU, wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._spans: list = []  # (phase, start event, end event) not read yet
        self._last = None

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._last = self._stamp()

    def mark(self, phase: str) -> None:
        """Charge `phase` with the time since the previous mark (or `start`)."""
        now = self._stamp()
        if self.cuda:
            self._spans.append((phase, self._last, now))
        else:
            self.seconds[phase] += now - self._last
        self._last = now

    def host(self, phase: str, since: float) -> None:
        """Charge `phase` with the host's wall time since `since` (perf_counter)."""
        self.seconds[phase] += time.perf_counter() - since

    def collect(self, wait: bool = False) -> dict[str, float]:
        """Add the spans whose events have passed (all of them with `wait`); returns the seconds so far."""
        pending = []
        for phase, start, end in self._spans:
            if wait:
                end.synchronize()
            if end.query():
                self.seconds[phase] += start.elapsed_time(end) / 1000
            else:
                pending.append((phase, start, end))
        self._spans = pending
        return dict(self.seconds)


@dataclass
class Handoff:
    """One batch on its way to the sink: what to tell it, and the batch's outputs being copied to the host."""

    shard: int
    begins: bool
    ends: bool
    images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    records: list[ImageRecord] = field(default_factory=list)  # the extracted images
    masks: list = field(default_factory=list)  # per extracted image: its regions' RLEs, or None
    host: torch.Tensor | None = None  # uint8 [bytes]: the _COPIED arrays of the batch, back to back
    layout: list = field(default_factory=list)  # (name, numpy dtype, shape) of each array in `host`
    ready: torch.cuda.Event | None = None  # recorded after the copy (CUDA)

    def deliver(self, sink: ShardSink, on_batch: Callable[[int, int], None]) -> None:
        """Wait for the copy, then hand the batch to the sink; the samples' arrays are views of `host`."""
        if self.ready is not None:
            self.ready.synchronize()
        if self.begins:
            sink.begin(self.shard)
        for key, reason in self.skipped:
            sink.skip(key, reason)
        regions = 0
        if self.records:
            arrays, offset = {}, 0
            buffer = self.host.numpy()
            for name, dtype, shape in self.layout:
                size = int(np.prod(shape)) * dtype.itemsize
                arrays[name] = buffer[offset : offset + size].view(dtype).reshape(shape)
                offset += size
            starts = np.cumsum([0] + [len(r.boxes) for r in self.records])
            for i, record in enumerate(self.records):
                sink.write(_sample(record, arrays, starts[i], starts[i + 1], i, self.masks[i]))
            regions = int(starts[-1])
        on_batch(self.images, regions)
        if self.ends:  # the last batch of every shard closes it, so a killed run loses at most the shard in flight
            sink.end()


def _sample(record: ImageRecord, arrays: dict[str, np.ndarray], start: int, stop: int, image: int, masks) -> Sample:
    return Sample(
        key=record.key,
        image_id=record.image_id,
        file_name=record.file_name,
        width=int(record.width),
        height=int(record.height),
        boxes=record.boxes.astype(STORED_DTYPES["boxes"]),
        labels=record.labels.astype(STORED_DTYPES["labels"]),
        scores=record.scores.astype(STORED_DTYPES["scores"]),
        sam_tokens=arrays["sam_tokens"][start:stop],
        sam_iou=arrays["sam_iou"][start:stop],
        clip_map=arrays["clip_map"][image],
        masks=masks,
    )


def _to_host(outputs: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list, object]:
    """One device-to-host copy of the outputs, each converted to its stored dtype on the device first.

    On CUDA the copy goes, without waiting, into a fresh page-locked buffer from torch's caching host
    allocator, with an event to wait on: the numpy views the sink holds keep their buffer alive, so a
    buffer is reused only after the sink has let go of every view of it. On the CPU there is nothing to copy.
    Returns (uint8 [bytes], [(name, numpy dtype, shape)], the event or None).
    """
    parts, layout = [], []
    for name in _COPIED:
        t = outputs[name].to(_STORED[name]).contiguous()
        parts.append(t.reshape(-1).view(torch.uint8))
        layout.append((name, STORED_DTYPES[name], tuple(t.shape)))
    flat = torch.cat(parts)  # (bytes,)
    if device.type != "cuda":
        return flat, layout, None
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, layout, ready


def _boxes_to(device: torch.device, records: Sequence[ImageRecord]) -> list[torch.Tensor]:
    """The records' boxes on `device` ([Ni, 4] each), in one copy that does not wait for the device."""
    boxes = torch.from_numpy(np.concatenate([r.boxes for r in records]))  # (N, 4)
    if device.type == "cuda":
        boxes = boxes.pin_memory()
    return list(boxes.to(device, non_blocking=True).split([len(r.boxes) for r in records]))


def _compute(
    batch, records, backbones, shard_size: int, masks: bool, device, size_mismatch, timer: PhaseTimer
) -> tuple[Handoff, int]:
    """One batch on the device, up to the started copy to the host; returns it and its CPU-decoded count."""
    sam, clip = backbones.sam, backbones.clip
    first, last = batch[0].position, batch[-1].position
    shard = first // shard_size
    positions = shard_range(shard, shard_size, len(records))
    handoff = Handoff(shard, begins=first == positions[0], ends=last == positions[-1], images=len(batch))
    timer.start()
    images, on_cpu = decode_images(batch, records, device, size_mismatch)
    timer.mark("decode")
    good = []
    for file, image in zip(batch, images, strict=True):
        if isinstance(image, str):
            handoff.skipped.append((records[file.position].key, image))
        else:
            good.append((records[file.position], image))
    if not good:
        return handoff, on_cpu
    handoff.records = [r for r, _ in good]
    boxes = _boxes_to(device, handoff.records)  # copied while the images are preprocessed
    pixels = [image for _, image in good]  # uint8 [3, H, W] each
    sam_batch, clip_batch = sam.prepare(pixels), clip.prepare(pixels)
    del pixels, images, good  # the decoded images: their device memory is free before the encoders run
    timer.mark("preprocess")
    embeddings = sam.encode(sam_batch)  # (B, 256, h, w)
    timer.mark("sam_encoder")
    sizes = [(r.height, r.width) for r in handoff.records]
    tokens = sam.region_tokens(embeddings, boxes, sizes, masks=masks)
    timer.mark("sam_decoder")
    clip_maps = clip.feature_map(clip_batch)  # (B, L, C)
    timer.mark("clip")
    handoff.masks = [t.masks for t in tokens]
    outputs = {
        "sam_tokens": torch.cat([t.tokens for t in tokens]),  # (N, T, 256)
        "sam_iou": torch.cat([t.iou for t in tokens]),  # (N, T)
        "clip_map": clip_maps,
    }
    handoff.host, handoff.layout, handoff.ready = _to_host(outputs, device)
    timer.mark("copy")
    return handoff, on_cpu


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
) -> dict[str, float | int]:
    """Extract the given shards of `records` into `sink`.

    Batch k's outputs are copied to the host while batch k+1 is computed; batch k reaches the sink
    after that. Any batch size works (32 suits a GPU, 8 the CPU).

    size_mismatch: for an image whose size is not its annotation's, see `load_record_image`.
    Returns: seconds per phase, and under CPU_DECODED the number of images decoded on the CPU (files
        the device decoder cannot or would not read).
    """
    batches = shard_batches(shards, shard_size, len(records), batch_size)
    loader = DataLoader(
        ImageFiles(records, size_mismatch),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    timer = PhaseTimer(device)
    on_cpu = 0
    pending: Handoff | None = None
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.inference_mode():
        waited = time.perf_counter()
        for batch in loader:
            timer.host("read (workers)", waited)
            handoff, decoded_on_cpu = _compute(
                batch, records, backbones, shard_size, masks, device, size_mismatch, timer
            )
            on_cpu += decoded_on_cpu
            if pending is not None:
                start = time.perf_counter()
                pending.deliver(sink, on_batch)
                timer.host("handoff", start)
                timer.collect()
            pending = handoff
            waited = time.perf_counter()
        if pending is not None:
            start = time.perf_counter()
            pending.deliver(sink, on_batch)
            timer.host("handoff", start)
    return {**timer.collect(wait=True), CPU_DECODED: on_cpu}


def count_regions(records: Sequence[ImageRecord]) -> int:
    # labels, not boxes: an OpenImages record reads its image header for pixel boxes on first access
    return int(np.sum([len(r.labels) for r in records])) if records else 0
