"""Shards -> padded batches: what training and evaluation feed the head.

A batch pads each image's regions to the batch's largest count and marks real regions in
`region_mask`; padded rows are zeros with label -1 (no repeated boxes).

Batches are assembled where they are used: `assemble` knows every sample's region count from the
per-sample index before reading, allocates the batch once (pinned memory for a GPU) and reads each
sample's array data straight into its rows, so a sample's bytes are copied once, from the page cache to
the batch, and checked on the way (shards/index.py).

A DataLoader worker assembles into one of a few shared buffers it reuses (`WorkerMemory`) rather than
into fresh shared memory per batch; the main process copies each batch out in one pass (into pinned
memory in the DataLoader's pin thread, for the GPU) and gives the buffer back.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import FEATURE_DTYPE, SAM_DIM, STORED_DTYPES, Sample
from regionspot.shards.shardset import ShardSet
from regionspot.shards.storage import ShardReader, read_shard

TORCH_FEATURE_DTYPE: torch.dtype = getattr(torch, FEATURE_DTYPE.name)  # the stored features, in torch
_PADDED = ("boxes", "scores", "sam_tokens", "sam_iou")  # region arrays copied as stored; labels widen to int64
_ALIGN = 64  # byte alignment of each field inside a batch's one allocation
_TORCH_DTYPES = {name: getattr(torch, dtype.name) for name, dtype in STORED_DTYPES.items()}


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


def _shared(nbytes: int) -> torch.Tensor:
    """`nbytes` of shared memory, as a flat uint8 tensor (it crosses processes without a copy).

    Raises:
        RegionSpotError naming the fix when the system has no room (a container's /dev/shm is 64 MB by
        default).
    """
    try:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
    except RuntimeError as e:
        raise RegionSpotError(
            f"cannot allocate {nbytes / 2**20:.1f} MiB of shared memory for a DataLoader worker's batch ({e}); "
            "give /dev/shm more room (docker run --shm-size=4g, or --ipc=host) or use fewer --workers"
        ) from e


def _layout(b: int, n: int, t: int, clip_shape: tuple[int, int]) -> tuple[dict[str, tuple], int]:
    """({field: (shape, dtype, byte offset)}, bytes in all) of a batch of B images padded to N regions in
    one allocation."""
    specs = {
        "sam_tokens": ((b, n, t, SAM_DIM), _TORCH_DTYPES["sam_tokens"]),
        "sam_iou": ((b, n, t), _TORCH_DTYPES["sam_iou"]),
        "clip_map": ((b, *clip_shape), _TORCH_DTYPES["clip_map"]),
        "boxes": ((b, n, 4), _TORCH_DTYPES["boxes"]),
        "scores": ((b, n), _TORCH_DTYPES["scores"]),
        "labels": ((b, n), torch.int64),
        "region_mask": ((b, n), torch.bool),
    }
    fields, total = {}, 0
    for name, (shape, dtype) in specs.items():
        fields[name] = (shape, dtype, total)
        total += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return fields, total


def _carve(flat: torch.Tensor, fields: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The batch's tensors as views of `flat` (uint8), laid out by `_layout`."""
    return {
        name: flat[at : at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        if math.prod(shape)
        else torch.empty(shape, dtype=dtype)  # torch views no empty byte range as another dtype
        for name, (shape, dtype, at) in fields.items()
    }


def _flat(nbytes: int, pin: bool = False, memory: WorkerMemory | None = None) -> torch.Tensor:
    """`nbytes` of uninitialised memory for a batch, as a flat uint8 tensor: with `memory`, a DataLoader
    worker's reused shared buffer (see `WorkerMemory`); pinned memory with `pin` (asynchronous copies to
    the GPU; torch's caching host allocator reuses the blocks once their copies are done); else ordinary
    memory."""
    if memory is not None:
        return memory.take(max(nbytes, 1))
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # numpy asks the kernel for huge pages for large arrays (far fewer page faults as reads fill it), and
    # the C heap hands the same memory back batch after batch, its pages already there
    return torch.from_numpy(np.empty(nbytes, np.uint8))


def _allocate(
    b: int, n: int, t: int, clip_shape: tuple[int, int], pin: bool = False, memory: WorkerMemory | None = None
) -> dict[str, torch.Tensor]:
    """The uninitialised tensors of a batch of B images padded to N regions, carved from one allocation
    (`_flat`'s)."""
    fields, total = _layout(b, n, t, clip_shape)
    return _carve(_flat(total, pin, memory), fields)


# main process: (memory token, worker, buffer index) -> that worker buffer, mapped here once and kept
_RECEIVED: dict[tuple[int, int, int], torch.Tensor] = {}
_TOKENS = itertools.count()


def _forget(token: int) -> None:
    for where in [w for w in list(_RECEIVED) if w[0] == token]:
        _RECEIVED.pop(where, None)


@dataclass
class SharedBatch:
    """A batch as a worker hands it over from its reused memory (`WorkerMemory`): which buffer, and the
    batch's shape in it. The buffer itself crosses the process boundary only the first time (one file
    descriptor; its pages are never copied): the main process keeps it mapped for the batches after.
    The DataLoader's pin thread calls `pin_memory`; `WorkerMemory.receive` copies the batch out."""

    memory: int  # the WorkerMemory's token
    worker: int
    index: int  # the buffer's index among the worker's
    flat: torch.Tensor | None  # the buffer, when the main process has not received it yet
    shape: tuple[int, int, int, tuple[int, int]]  # (B, N, T, [L, C])
    keys: list[str]
    image_ids: list
    sizes: list[tuple[int, int]]
    pinned: Batch | None = None  # the pinned copy, once pin_memory made it

    def copy(self, pin: bool = False) -> Batch:
        """(Main process) The batch in memory of its own, pinned with `pin`: one copy of its bytes."""
        where = (self.memory, self.worker, self.index)
        if self.flat is not None:
            _RECEIVED[where] = self.flat
        fields, total = _layout(*self.shape)
        flat = _flat(total, pin)
        np.copyto(flat.numpy(), _RECEIVED[where][:total].numpy())  # one thread: torch's copy_ would wake its pool
        return Batch(keys=self.keys, image_ids=self.image_ids, sizes=self.sizes, **_carve(flat, fields))

    def pin_memory(self) -> SharedBatch:
        return replace(self, flat=None, pinned=self.copy(pin=True))


class WorkerMemory:
    """Batch memory that DataLoader workers reuse: `depth` shared buffers per worker.

    A fresh shared-memory batch costs more than reading the batch into it: creating the segment and
    faulting its pages in took ~4.5 ms of a core for 16 `bl` images, against ~2.5 ms for reading and
    checking them, and passing its tensors to the main process ~2 ms more. So each worker writes its
    batches into its own buffers in turn (`take`) and hands them over as `SharedBatch`es; it takes a
    buffer only after the main process gave it back (`receive`), once the batch is copied out (pinned
    for the GPU). A buffer grows when a batch needs more room.

    Made in the main process before the workers start (they inherit it, semaphores included); the
    DataLoader must start them in `context`. Each worker's copy holds that worker's buffers. `close()` (or
    its collection) in the main process forgets the buffers it received.
    """

    def __init__(self, workers: int, prefetch: int):
        # a worker's buffers in use at once: `prefetch` batches queued, one being copied out in the main
        # process, one being filled
        self.depth, self.token = prefetch + 2, next(_TOKENS)
        self.context = torch.multiprocessing.get_context()
        self._free = [self.context.Semaphore(self.depth) for _ in range(workers)]
        self.close = weakref.finalize(self, _forget, self.token)  # (main process) forget the workers' buffers
        self.worker: int | None = None  # set in each worker process
        self._buffers: list[torch.Tensor] = []
        self._sent: list[bool] = []  # whether the main process has received that buffer
        self._turn = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """This worker's next buffer, at least `nbytes` long; waits until the main process gave it back."""
        self._free[self.worker].acquire()
        i = self._turn
        if i == len(self._buffers):
            self._buffers.append(_shared(nbytes))
            self._sent.append(False)
        elif self._buffers[i].numel() < nbytes:
            self._buffers[i] = _shared(nbytes + nbytes // 4)  # room for the next larger batch
            self._sent[i] = False
        return self._buffers[i][:nbytes]

    def hand_over(self, batch: Batch) -> SharedBatch:
        """The batch just assembled in the buffer `take` gave, as the main process receives it."""
        i, self._turn = self._turn, (self._turn + 1) % self.depth
        b, n, t = batch.sam_iou.shape
        shape = (b, n, t, tuple(batch.clip_map.shape[1:]))
        flat = None if self._sent[i] else self._buffers[i]
        self._sent[i] = True
        return SharedBatch(self.token, self.worker, i, flat, shape, batch.keys, batch.image_ids, batch.sizes)

    def receive(self, shared: SharedBatch) -> Batch:
        """(Main process) `shared` copied out of its worker's buffer, the buffer then given back to the
        worker: the pinned copy the DataLoader's pin thread made, else a copy in memory of its own."""
        batch = shared.pinned if shared.pinned is not None else shared.copy()
        self._free[shared.worker].release()
        return batch

    def __getstate__(self) -> dict:
        return self.__dict__ | {"close": None}  # a worker started by spawning gets a copy; close is the main's


def _pad(arrays: dict[str, np.ndarray], counts: Sequence[int]) -> None:
    """Mark each row's first counts[i] regions real and zero the padding after them (label -1)."""
    real = arrays["region_mask"]
    real[...] = np.arange(real.shape[1]) < np.asarray(counts, np.int64)[:, None]  # (B, N)
    padding = ~real
    for name in _PADDED:
        arrays[name][padding] = 0
    arrays["labels"][padding] = -1


def _batch(samples: Sequence[Sample], tensors: dict[str, torch.Tensor]) -> Batch:
    return Batch(
        keys=[s.key for s in samples],
        image_ids=[s.image_id for s in samples],
        sizes=[(s.width, s.height) for s in samples],
        **tensors,
    )


def _check_one_layout(layouts: Sequence[tuple[int, tuple]], key: Callable[[int], str]) -> tuple[int, tuple]:
    """The (T, [L, C]) shared by every sample of a batch; `key(i)` names sample i (only for the error)."""
    for i, layout in enumerate(layouts):
        if layout != layouts[0]:
            raise RegionSpotError(
                f"cannot batch sample {key(i)!r} (T={layout[0]}, clip map {list(layout[1])}) with {key(0)!r} "
                f"(T={layouts[0][0]}, clip map {list(layouts[0][1])}): samples from other backbones"
            )
    return layouts[0] if layouts else (1, (0, 0))


def collate(samples: list[Sample], pin: bool = False) -> Batch:
    """Pad samples already in memory into one `Batch`; features stay float16 until `Batch.to(dtype=...)`.

    Args:
        samples: B samples with one token count T and one CLIP map shape [L, C]; any may have N_i = 0.
        pin: allocate the batch in pinned memory (needs CUDA).
    Returns:
        Batch with N = max N_i (0 when no sample has a region): real regions first in each row,
        `region_mask` True on them, padded rows zero with label -1. One copy per field.
    """
    t, clip_shape = _check_one_layout(
        [(s.sam_tokens.shape[1], tuple(s.clip_map.shape)) for s in samples], lambda i: samples[i].key
    )
    n = max((s.num_regions for s in samples), default=0)
    tensors = _allocate(len(samples), n, t, clip_shape, pin)
    arrays = {name: x.numpy() for name, x in tensors.items()}
    for i, s in enumerate(samples):
        k = s.num_regions
        for name in (*_PADDED, "labels"):
            arrays[name][i, :k] = getattr(s, name)
        arrays["clip_map"][i] = s.clip_map
    _pad(arrays, [s.num_regions for s in samples])
    return _batch(samples, tensors)


@dataclass(eq=False)
class SampleRef:
    """A sample of a shard not read yet: what a training stream's shuffle buffer holds; `assemble` reads it.

    `labels` replaces its stored labels (the shuffled-label control; the stored ones are still checked);
    `rows` keeps only those regions (sorted indices into the sample's regions, e.g. a region cap).
    """

    reader: ShardReader
    index: int
    labels: np.ndarray | None = None
    rows: np.ndarray | None = None

    @property
    def key(self) -> str:
        return self.reader.key(self.index)

    @property
    def num_regions(self) -> int:
        return len(self.rows) if self.rows is not None else self.reader.regions(self.index)


def assemble(
    refs: Sequence[SampleRef], verify: bool = True, pin: bool = False, memory: WorkerMemory | None = None
) -> tuple[Batch, list[Sample]]:
    """Read samples straight into one padded `Batch` (as `collate` pads): each sample's array data goes
    from its shard to its rows of the batch in one read, checked against the shard's index.

    Args:
        refs: B samples with one token count T and one CLIP map shape [L, C].
        verify: check each sample's checksum (shapes, dtypes, keys and labels are always checked).
        pin: allocate the batch in pinned memory (needs CUDA).
        memory: a DataLoader worker's reused batch memory (the main process releases it after copying the batch out).
    Returns:
        (batch, samples): the samples' arrays are views of the batch's rows (labels: int32 copies).
    Raises:
        ShardFault naming the shard and the sample: a checksum mismatch, a truncated shard, an array of
        another shape or dtype, a label outside the vocabulary.
    """
    t, clip_shape = _check_one_layout(
        [(r.reader.tokens, r.reader.clip_shape or (0, 0)) for r in refs], lambda i: refs[i].key
    )
    counts = [r.num_regions for r in refs]
    tensors = _allocate(len(refs), max(counts, default=0), t, clip_shape, pin, memory)
    arrays = {name: x.numpy() for name, x in tensors.items()}
    samples = []
    for i, (ref, k) in enumerate(zip(refs, counts, strict=True)):
        dest = {"clip_map": arrays["clip_map"][i]}
        if ref.rows is None:
            dest.update({name: arrays[name][i, :k] for name in _PADDED})
        sample = ref.reader.read_into(ref.index, dest, verify)
        labels = sample.labels if ref.labels is None else np.asarray(ref.labels, np.int32)
        if ref.rows is not None:  # a subset of the regions: gathered from the sample's own copy
            rows = np.asarray(ref.rows)
            for name in _PADDED:
                arrays[name][i, :k] = getattr(sample, name)[rows]
            masks = None if sample.masks is None else [sample.masks[j] for j in rows]
            sample = replace(sample, **{name: arrays[name][i, :k] for name in _PADDED}, masks=masks)
            labels = labels[rows]
        arrays["labels"][i, :k] = labels
        sample.labels = labels
        samples.append(sample)
    _pad(arrays, counts)
    return _batch(samples, tensors), samples


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


class _Fault:
    """A read fault met in a DataLoader worker, passed on as data: the main process raises it as one line
    (a worker's exception would arrive wrapped in its traceback)."""

    def __init__(self, message: str):
        self.message = message


class _Ordered(torch.utils.data.IterableDataset):
    """Batches of a shard set in manifest order. Batch j goes to worker j mod W, and the DataLoader
    takes one batch from each worker in turn, so the stream stays in manifest order with any W.
    Each batch is read through the shard's index; only the batch's tensors and each sample's file name
    and masks leave the worker (the samples are rebuilt as views of the batch)."""

    def __init__(self, shards: ShardSet, batch_size: int, memory: WorkerMemory | None = None):
        self.shards, self.batch_size, self.memory = shards, batch_size, memory
        self.plan = batch_plan(shards, batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.memory is not None:
            self.memory.worker = w
        try:
            for j, (i, a, b) in enumerate(self.plan):
                if j % workers == w:
                    reader = self.shards.reader(i)
                    batch, samples = assemble([SampleRef(reader, k) for k in range(a, b)], memory=self.memory)
                    if self.memory is not None:
                        batch = self.memory.hand_over(batch)
                    yield batch, [(s.file_name, s.masks) for s in samples]
        except RegionSpotError as e:
            yield _Fault(str(e))


def _views(batch: Batch, extras: list[tuple]) -> list[Sample]:
    """The batch's samples, their arrays views of its rows."""
    counts = batch.region_mask.sum(1).tolist()
    return [
        Sample(
            key=batch.keys[i],
            image_id=batch.image_ids[i],
            file_name=file_name,
            width=batch.sizes[i][0],
            height=batch.sizes[i][1],
            **{name: getattr(batch, name)[i, :k].numpy() for name in _PADDED},
            labels=batch.labels[i, :k].numpy().astype(STORED_DTYPES["labels"]),
            clip_map=batch.clip_map[i].numpy(),
            masks=masks,
        )
        for i, (k, (file_name, masks)) in enumerate(zip(counts, extras, strict=True))
    ]


def iter_batches(
    shards: ShardSet, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Batch, list[Sample]]]:
    """(Batch, its samples) over the whole set in manifest order, for evaluation; the samples' arrays are
    views of the batch.

    Args:
        shards: the shard set.
        batch_size: images per batch; a batch never spans two shards, so a shard's last one may be short.
        num_workers: DataLoader worker processes reading shards in parallel (order is kept).
    Raises:
        ShardFault (one line naming the shard and the sample) when a sample is not as its index says.
    """
    memory = WorkerMemory(num_workers, prefetch=4) if num_workers > 0 else None
    dataset = _Ordered(shards, batch_size, memory)
    items = dataset
    if memory is not None:
        items = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4, multiprocessing_context=memory.context
        )
    try:
        for item in items:
            if isinstance(item, _Fault):
                raise RegionSpotError(item.message)
            batch, extras = item
            if memory is not None:
                batch = memory.receive(batch)
            yield batch, _views(batch, extras)
    finally:
        if memory is not None:
            memory.close()
