"""The shard sink: a background thread that writes finished samples so the accelerator never waits for disk.

The compute loop hands it samples in key order, one shard at a time; the sink thread passes them to
the shard set writer's open shard, and when a shard ends closes it (temporary name -> final name,
hash, record: what marks the shard complete for resume and for the manifest).
"""

from __future__ import annotations

import queue
import threading
import time

from regionspot.shards.schema import Sample
from regionspot.shards.writer import ShardSetWriter


class ShardSink:
    def __init__(self, shards: ShardSetWriter, max_pending: int = 64):
        self.shards = shards
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.busy_seconds = 0.0
        self.records: list[dict] = []
        self._thread = threading.Thread(target=self._run, name="regionspot-shard-sink", daemon=True)
        self._thread.start()

    # --- the compute thread's side ---
    def begin(self, index: int) -> None:
        self._put(("begin", index))

    def write(self, sample: Sample) -> None:
        self._put(("sample", sample))

    def skip(self, key: str, reason: str) -> None:
        self._put(("skip", key, reason))

    def end(self) -> None:
        self._put(("end",))

    def close(self) -> list[dict]:
        """Wait for every queued shard to be written; returns the records written by this sink."""
        self._put(None)
        self._thread.join()
        self._raise()
        return self.records

    def _put(self, item) -> None:
        self._raise()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # --- the sink thread ---
    def _run(self) -> None:
        shard = None
        try:
            while (item := self._queue.get()) is not None:
                start = time.perf_counter()
                kind = item[0]
                if kind == "begin":
                    shard = self.shards.open_shard(item[1])
                elif kind == "sample":
                    shard.write(item[1])
                elif kind == "skip":
                    shard.skip(item[1], item[2])
                elif kind == "end":
                    self.records.append(shard.close())
                    shard = None
                self.busy_seconds += time.perf_counter() - start
        except BaseException as e:  # surfaced on the compute thread's next call
            self._error = e
            if shard is not None:
                try:
                    shard.abort()
                except OSError:  # e.g. the disk that failed the write: the first error is the one to report
                    pass
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
