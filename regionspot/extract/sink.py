"""The shard sink: a background thread that writes finished samples so the accelerator never waits for disk.

The compute loop hands it samples in key order, one shard at a time; when a shard ends, the sink
closes the shard (temp name -> final name), hashes it and writes `shard-NNNNNN.json`, the record
that marks the shard complete for resume and for the manifest.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from regionspot.shards.manifest import write_json_atomic
from regionspot.shards.schema import Sample, record_name, shard_name
from regionspot.shards.storage import open_writer, shard_checksum


class ShardSink:
    def __init__(self, out: Path, storage: str, max_pending: int = 64):
        self.out, self.storage = Path(out), storage
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
        writer = None
        try:
            while (item := self._queue.get()) is not None:
                start = time.perf_counter()
                kind = item[0]
                if kind == "begin":
                    index, samples, regions, skipped = item[1], 0, 0, []
                    writer = open_writer(self.storage, self.out / shard_name(index, self.storage))
                elif kind == "sample":
                    writer.write(item[1])
                    samples, regions = samples + 1, regions + item[1].num_regions
                elif kind == "skip":
                    skipped.append({"key": item[1], "reason": item[2]})
                elif kind == "end":
                    writer.close()
                    writer = None
                    name = shard_name(index, self.storage)
                    sha256, nbytes = shard_checksum(self.out / name)
                    record = {"index": index, "name": name, "samples": samples, "regions": regions,
                              "bytes": nbytes, "sha256": sha256, "skipped": skipped}
                    write_json_atomic(self.out / record_name(index), record)
                    self.records.append(record)
                self.busy_seconds += time.perf_counter() - start
        except BaseException as e:  # surfaced on the compute thread's next call
            self._error = e
            if writer is not None:
                writer.abort()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
