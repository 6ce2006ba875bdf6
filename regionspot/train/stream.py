"""The training stream: endless, seeded, resumable batches mixed from one or more shard sets.

Per step and rank: a dataset is drawn (equal weights by default, as the paper's sampler), and the
micro-batch is that dataset's next `batch_size` images with regions. Each dataset's reader walks
its shards in a seeded order per epoch (rank r of W takes every W-th shard; with fewer shards than
ranks, shards are reused so no rank starves) and interleaves `open_shards` shards at random, a
cheap shuffle that needs no buffer. The whole position — RNG states, epoch, shard cursor and the
offset of every open shard — is a small dict, so a resumed run reads exactly what an uninterrupted
one would have read.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator

import numpy as np

from regionspot.shards.loader import Batch, collate
from regionspot.shards.schema import Sample
from regionspot.shards.shardset import ShardSet
from regionspot.shards.storage import read_shard


class _OpenShard:
    def __init__(self, shards: ShardSet, index: int, offset: int = 0):
        self.index, self.offset = index, offset
        self._it = read_shard(shards.shard_paths[index])
        for _ in range(offset):  # resume: skip what was already read
            next(self._it)

    def next(self) -> Sample | None:
        sample = next(self._it, None)
        if sample is not None:
            self.offset += 1
        return sample


class DatasetReader:
    """One dataset's endless sample stream for one rank."""

    def __init__(
        self,
        shards: ShardSet,
        rank: int,
        world: int,
        seed: int,
        open_shards: int = 4,
        shuffle_labels: bool = False,
        state: dict | None = None,
    ):
        self.shards, self.rank, self.world, self.seed = shards, rank, world, seed
        self.open_shards, self.shuffle_labels = open_shards, shuffle_labels
        self.rng = np.random.default_rng([seed, rank, 1])
        self.epoch, self.cursor, self.open = 0, 0, []
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
            self.epoch, self.cursor = state["epoch"], state["cursor"]
            self.open = [_OpenShard(shards, i, off) for i, off in state["open"]]

    def state(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "open": [[s.index, s.offset] for s in self.open],
        }

    def _my_shards(self, epoch: int) -> list[int]:
        n = len(self.shards.shard_paths)
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(n).tolist()
        return [order[i % n] for i in range(self.rank, max(n, self.world), self.world)]

    def _refill(self) -> None:
        while len(self.open) < self.open_shards:
            mine = self._my_shards(self.epoch)
            if self.cursor >= len(mine):
                if not self.open:
                    self.epoch, self.cursor = self.epoch + 1, 0
                    continue
                return
            self.open.append(_OpenShard(self.shards, mine[self.cursor]))
            self.cursor += 1

    def next(self) -> Sample:
        """The next image with at least one region."""
        empty_passes = 0
        while True:
            self._refill()
            pick = int(self.rng.integers(len(self.open)))
            sample = self.open[pick].next()
            if sample is None:
                self.open.pop(pick)
                empty_passes += 1
                if empty_passes > 10 * (len(self.shards.shard_paths) + self.open_shards):
                    raise RuntimeError(f"{self.shards.path}: no image with regions")
                continue
            if sample.num_regions == 0:
                continue
            if self.shuffle_labels:  # the control: labels that carry nothing about the region
                rng = np.random.default_rng([self.seed, zlib.crc32(sample.key.encode())])
                sample.labels = rng.integers(0, len(self.shards.vocabulary), sample.num_regions).astype(
                    np.int32
                )
            return sample


class MixedStream:
    """Batches for one rank: (dataset index, Batch, stream state after this batch)."""

    def __init__(
        self,
        sets: list[ShardSet],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        weights: list[float] | None = None,
        shuffle_labels: bool = False,
        state: dict | None = None,
        open_shards: int = 4,
    ):
        self.sets, self.batch_size = sets, batch_size
        w = np.asarray(weights if weights is not None else [1.0] * len(sets), float)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng([seed, rank, 0])
        states = state["readers"] if state else [None] * len(sets)
        if state:
            self.rng.bit_generator.state = state["rng"]
        self.readers = [
            DatasetReader(s, rank, world, seed + 1000 * i, open_shards, shuffle_labels, st)
            for i, (s, st) in enumerate(zip(sets, states, strict=True))
        ]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "readers": [r.state() for r in self.readers]}

    def next(self) -> tuple[int, Batch, dict]:
        d = int(self.rng.choice(len(self.sets), p=self.weights))
        samples = [self.readers[d].next() for _ in range(self.batch_size)]
        return d, collate(samples), self.state()


def prefetch(stream: MixedStream, depth: int = 4, pin: bool = False) -> Iterator[tuple[int, Batch, dict]]:
    """Run the stream in a background thread so the step never waits for reading and collating."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            while not stop.is_set():
                d, batch, state = stream.next()
                if pin:
                    batch = batch.pin_memory()
                while not stop.is_set():
                    try:
                        q.put((d, batch, state), timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:
            q.put(e)

    thread = threading.Thread(target=work, name="regionspot-train-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
