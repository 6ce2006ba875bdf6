"""The training stream: endless, seeded, resumable padded batches mixed from one or more shard sets.

What flows: shard indexes -> `DatasetReader` (references to images with regions, shuffled in a buffer)
-> `MixedReader` (one dataset per micro-batch) -> `assemble` (each image read once, checked, straight into
its padded rows; in a DataLoader worker, rows of a buffer it reuses) -> (dataset index, Batch) for the
step (from a worker: copied out of its buffer, pinned for the GPU).

Readers. Each (rank, DataLoader worker) is one reader g of R = world x workers, with its own seeded
generators, so what a reader yields depends only on (seed, g, R), never on timing. Per dataset, a reader
walks the shards an epoch permutation gives it (positions g, g + R, ... of a permutation seeded by
(seed, dataset, epoch)); with fewer shards than readers it draws shards at random with replacement,
so no reader starves. Images with zero regions are skipped. A shuffle buffer of `buffer` images per
dataset mixes neighbouring samples (webdataset's shuffle). Per micro-batch, the reader draws a dataset
by the mixing weights (equal by default, as the paper's sampler) and takes `batch_size` images from it:
each micro-batch has one vocabulary.

Data position. A reader's state is small: its generators' states, epoch and cursor, (shard, offset) of
the shard it reads, and (shard, offset) references of the images in its buffer (read when drawn).
Every batch leaves its worker with the state after it; `TrainStream` keeps the state of the last batch
it handed out from each reader and which reader comes next (the DataLoader visits workers in turn).
`TrainStream.position()` is what a checkpoint stores; a stream built from it yields exactly the
batches the uninterrupted stream would have, with any number of workers (the same number as before).

Region cap. With `max_regions`, an image with more regions keeps a random subset of them (in stored
order), drawn when the image leaves the buffer from the reader's generator: its state is part of the
data position, so a resumed stream draws the same subsets, and an image met again in a later epoch
gets another subset (the cap drops different regions over the run, not the same ones every time).
"""

from __future__ import annotations

import copy
import zlib
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from regionspot.errors import RegionSpotError
from regionspot.shards.loader import Batch, SampleRef, WorkerMemory, assemble
from regionspot.shards.shardset import ShardSet

POSITION_VERSION = 1


class DatasetReader:
    """One dataset's endless stream of images with regions, for reader `reader` of `readers`."""

    def __init__(
        self,
        shards: ShardSet,
        dataset: int,
        reader: int,
        readers: int,
        seed: int,
        buffer: int = 128,
        shuffle_labels: bool = False,
        state: dict | None = None,
        max_regions: int | None = None,
    ):
        self.shards, self.dataset, self.reader, self.readers = shards, dataset, reader, readers
        self.seed, self.buffer_size, self.shuffle_labels = seed, buffer, shuffle_labels
        self.max_regions = max_regions
        self.num_shards = len(shards.shard_names)
        self.rng = np.random.default_rng([seed, dataset, reader, 1])
        self.epoch, self.cursor = 0, 0  # position in this reader's shard list of the epoch
        self.shard: int | None = None  # the shard being read ...
        self.offset = 0  # ... and the index in it of the next sample to read
        self.buffer: list[tuple[int, int, SampleRef]] = []  # (shard, index, sample)
        self._schedule_cache: tuple[int, list[int]] | None = None
        if state is not None:
            self._restore(state)

    # --- which shards -------------------------------------------------------------------------
    def _schedule(self, epoch: int) -> list[int]:
        """This reader's shards in `epoch` (needs num_shards >= readers)."""
        if self._schedule_cache is None or self._schedule_cache[0] != epoch:
            order = np.random.default_rng([self.seed, self.dataset, epoch, 2]).permutation(self.num_shards)
            self._schedule_cache = (epoch, order[self.reader :: self.readers].tolist())
        return self._schedule_cache[1]

    def _next_shard(self) -> None:
        if self.num_shards < self.readers:  # too few shards to share out: draw with replacement
            self.shard = int(self.rng.integers(self.num_shards))
        else:
            if self.cursor >= len(self._schedule(self.epoch)):
                self.epoch, self.cursor = self.epoch + 1, 0
            self.shard = self._schedule(self.epoch)[self.cursor]
            self.cursor += 1
        self.offset = 0

    def _read(self) -> tuple[int, int, SampleRef]:
        """The next image with regions, in stored order: (shard, index in shard, sample), from the index."""
        misses, limit = 0, 20 * (self.shards.num_images + self.num_shards) + 100
        while True:
            if self.shard is None:
                self._next_shard()
            reader, index = self.shards.reader(self.shard), self.offset
            misses += 1
            if misses > limit:
                raise RegionSpotError(
                    f"{self.shards.path}: no image with regions found; extract a set with boxes"
                )
            if index >= len(reader):
                self.shard = None
                continue
            self.offset = index + 1
            if reader.regions(index) > 0:
                return self.shard, index, SampleRef(reader, index)

    # --- samples ------------------------------------------------------------------------------
    def next(self) -> SampleRef:
        """The next training image (at least one region, at most `max_regions`), drawn at random from
        the buffer."""
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._read())
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        sample = self.buffer.pop()[2]
        if self.shuffle_labels:  # the control: labels that carry nothing about the region
            rng = np.random.default_rng([self.seed, zlib.crc32(sample.key.encode())])
            sample.labels = rng.integers(0, len(self.shards.vocabulary), sample.num_regions).astype(np.int32)
        if self.max_regions is not None and sample.num_regions > self.max_regions:
            sample.rows = np.sort(self.rng.choice(sample.num_regions, self.max_regions, replace=False))
        return sample

    def state(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "shard": self.shard,
            "offset": self.offset,
            "buffer": [[s, k] for s, k, _ in self.buffer],
            "num_shards": self.num_shards,
        }

    def _restore(self, state: dict) -> None:
        if state["num_shards"] != self.num_shards:
            raise RegionSpotError(
                f"{self.shards.path} now has {self.num_shards} shards, the checkpoint's stream read "
                f"{state['num_shards']}; resume with the shard sets the run started with"
            )
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.shard, self.offset = state["shard"], state["offset"]
        wanted: dict[int, set[int]] = {}
        for s, k in state["buffer"]:
            wanted.setdefault(s, set()).add(k)
        found = {}
        for s, ks in wanted.items():
            if 0 <= s < self.num_shards:
                reader = self.shards.reader(s)
                found.update({(s, k): SampleRef(reader, k) for k in ks if 0 <= k < len(reader)})
        missing = [ref for ref in map(tuple, state["buffer"]) if ref not in found]
        if missing:
            raise RegionSpotError(
                f"{self.shards.path}: shard {missing[0][0]} lacks sample {missing[0][1]} the checkpoint's stream "
                "held; resume with the shard sets the run started with"
            )
        self.buffer = [(s, k, found[s, k]) for s, k in state["buffer"]]


class MixedReader:
    """One reader's micro-batches: a dataset drawn per batch, then `batch_size` of its images."""

    def __init__(
        self,
        sets: Sequence[ShardSet],
        batch_size: int,
        reader: int,
        readers: int,
        seed: int,
        weights: Sequence[float] | None = None,
        buffer: int = 128,
        shuffle_labels: bool = False,
        state: dict | None = None,
        max_regions: int | None = None,
    ):
        self.batch_size = batch_size
        w = np.asarray(weights if weights is not None else [1.0] * len(sets), float)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng([seed, reader, 0])
        states = state["datasets"] if state is not None else [None] * len(sets)
        if len(states) != len(sets):
            raise RegionSpotError(
                f"the checkpoint's stream mixed {len(states)} shard sets, this run finds {len(sets)}; "
                "resume with the shard sets the run started with"
            )
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
        self.datasets = [
            DatasetReader(s, i, reader, readers, seed, buffer, shuffle_labels, st, max_regions)
            for i, (s, st) in enumerate(zip(sets, states, strict=True))
        ]

    def next_batch(self) -> tuple[int, list[SampleRef]]:
        d = int(self.rng.choice(len(self.datasets), p=self.weights)) if len(self.datasets) > 1 else 0
        return d, [self.datasets[d].next() for _ in range(self.batch_size)]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "datasets": [r.state() for r in self.datasets]}


class _Readers(torch.utils.data.IterableDataset):
    """The DataLoader's dataset: worker w runs logical reader (w + first) mod W of this rank, so a
    resumed loader (which starts at worker 0) continues with the reader whose turn it was. A read fault
    travels as data ({"fault": message}), so the main process stops with its one line."""

    def __init__(
        self, sets, batch_size, rank, world, workers, seed, weights, buffer, shuffle_labels, states, first,
        max_regions, verify=True, pin=False, memory=None,
    ):  # fmt: skip
        super().__init__()
        self.sets, self.batch_size, self.rank, self.world, self.workers = (
            sets,
            batch_size,
            rank,
            world,
            workers,
        )
        self.seed, self.weights, self.buffer, self.shuffle_labels = seed, weights, buffer, shuffle_labels
        self.states, self.first, self.max_regions = states, first, max_regions
        self.verify, self.pin, self.memory = verify, pin, memory

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        logical = ((0 if info is None else info.id) + self.first) % self.workers
        if self.memory is not None:
            self.memory.worker = logical
        reader = MixedReader(
            self.sets,
            self.batch_size,
            self.rank * self.workers + logical,
            self.world * self.workers,
            self.seed,
            self.weights,
            self.buffer,
            self.shuffle_labels,
            self.states[logical],
            self.max_regions,
        )
        try:
            while True:
                d, samples = reader.next_batch()
                batch, _ = assemble(samples, self.verify, self.pin, self.memory)
                if self.memory is not None:
                    batch = self.memory.hand_over(batch)
                yield batch, {"reader": logical, "dataset": d, "state": reader.state()}
        except RegionSpotError as e:
            yield None, {"fault": str(e)}


class TrainStream:
    """Endless (dataset index, Batch) for one rank; `position()` lets a checkpoint continue it exactly.

    Args:
        sets: the shard sets to mix (fingerprints already checked).
        batch_size: images per micro-batch (this rank's share of the global batch).
        rank, world: this process among the data-parallel ranks.
        workers: DataLoader worker processes (0: read in this process); each is one reader.
        seed: the stream's seed (the same on every rank; readers differ by their index).
        weights: mixing weight per set (default equal).
        buffer: shuffle-buffer size per reader and dataset.
        position: a `position()` from a checkpoint, to continue that stream.
        pin_memory: pin batches (for asynchronous copies to a GPU); prefetch: batches per worker ahead.
        max_regions: keep at most this many regions of an image (a seeded subset; None: all).
        history: how many batches back `position(back=...)` can reach.
        verify: check every sample's checksum against its shard's index (shapes, dtypes and labels are
            always checked); a fault stops the stream with one line naming the shard and the sample.
    """

    def __init__(
        self,
        sets: Sequence[ShardSet],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        buffer: int = 128,
        shuffle_labels: bool = False,
        position: dict | None = None,
        pin_memory: bool = False,
        prefetch: int = 4,
        max_regions: int | None = None,
        history: int = 1,
        verify: bool = True,
    ):
        self.readers = max(1, workers)
        self.world = world
        if position is not None:
            if position.get("version") != POSITION_VERSION:
                raise RegionSpotError("the checkpoint's data position has an unknown layout; start a new run")
            if (position["world"], position["workers"]) != (world, self.readers):
                raise RegionSpotError(
                    f"the run was started with {position['world']} rank(s) x {position['workers']} reader(s) per "
                    f"rank, now {world} x {self.readers}; resume with the same --gpus and --workers (the data "
                    "position belongs to those readers)"
                )
            self.states, self.next_reader = copy.deepcopy(position["readers"]), position["next"]
        else:
            self.states, self.next_reader = [None] * self.readers, 0
        self._memory = WorkerMemory(workers, prefetch) if workers > 0 else None
        dataset = _Readers(
            list(sets),
            batch_size,
            rank,
            world,
            self.readers,
            seed,
            weights,
            buffer,
            shuffle_labels,
            list(self.states),
            self.next_reader,
            max_regions,
            verify,
            pin_memory and workers == 0,  # workers write shared memory; the DataLoader pins it
            self._memory,
        )
        # (reader states, next reader) after each of the last batches, the newest last
        self._past = deque([(list(self.states), self.next_reader)], maxlen=history + 1)
        self._loader = None
        if workers == 0:
            self._it = iter(dataset)
        else:
            self._loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                pin_memory=pin_memory,
                prefetch_factor=prefetch,
                multiprocessing_context=self._memory.context,
                # its own generator: starting workers must not draw from the global RNG (dropout's)
                generator=torch.Generator().manual_seed(seed),
            )
            self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Batch]:
        batch, info = next(self._it)
        if "fault" in info:
            raise RegionSpotError(info["fault"])
        if self._memory is not None:  # a SharedBatch in its worker's reused memory
            batch = self._memory.receive(batch)
        if info["reader"] != self.next_reader:  # the DataLoader visits workers in turn; never otherwise
            raise RuntimeError(f"batch from reader {info['reader']}, expected reader {self.next_reader}")
        self.states[info["reader"]] = info["state"]
        self.next_reader = (info["reader"] + 1) % self.readers
        self._past.append((list(self.states), self.next_reader))  # the states are never mutated: no copy
        return info["dataset"], batch

    def position(self, back: int = 0) -> dict:
        """The data position after the last batch handed out (plain data: a checkpoint stores it), or
        the one `back` batches earlier (a stream built from it yields those `back` batches again)."""
        if back >= len(self._past):
            raise ValueError(f"position {back} batches back; this stream keeps {len(self._past) - 1}")
        states, following = self._past[-1 - back]
        return {
            "version": POSITION_VERSION,
            "world": self.world,
            "workers": self.readers,
            "next": following,
            "readers": copy.deepcopy(states),
        }

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = None
        self._loader = None
        if self._memory is not None:
            self._memory.close()
