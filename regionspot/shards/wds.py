"""webdataset storage: `shard-NNNNNN.tar`, one `<key>.json` and one `<key>.<field>.npy` per field per image.

Reading: any tar reader works (`tar tf shard-000000.tar`); in Python, `read_wds(path)` yields
`Sample`s. Only the member names of the schema are decoded, arrays with `allow_pickle=False` semantics
(an object dtype is refused); the default webdataset decoders are never used (they would unpickle
`.pyd` / `.pth` members). Tars are reproducible: fixed mtime, owner and mode, members in sample order
and field order, so the same samples give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import ARRAY_FIELDS, META_FIELDS, Sample, ShardGuard, json_default


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class WdsShardWriter:
    """Writes one tar under a temporary name (`.shard-NNNNNN.tar.tmp-PID`); `close()` renames it into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._guard = ShardGuard(self.path)
        # PAX: same bytes as ustar for short ASCII names, and still valid for long or non-ASCII keys
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, sample: Sample) -> None:
        """Append one sample: `<key>.json`, then `<key>.<field>.npy` in ARRAY_FIELDS order."""
        self._guard(sample)
        meta = json.dumps(sample.meta(), sort_keys=True, separators=(",", ":"), default=json_default).encode()
        self._add(f"{sample.key}.json", meta)
        for name, array in sample.arrays().items():
            self._add(f"{sample.key}.{name}.npy", _npy_bytes(array))

    def close(self) -> None:
        self._tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished tar, also when closing it fails (a full disk fails the end blocks too)."""
        try:
            self._tar.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> WdsShardWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.abort() if kind is not None else self.close()


def _pread(fd: int, offset: int, size: int) -> bytearray:
    """`size` bytes at `offset`, read straight into a writable buffer (one copy, file position untouched)."""
    buf = bytearray(size)
    got = os.preadv(fd, [buf], offset)
    if got != size:
        raise EOFError(f"member at byte {offset} is truncated ({got} of {size} bytes)")
    return buf


def _npy(buf: bytearray) -> np.ndarray:
    """Decode .npy bytes without copying the data; object arrays (pickles) are refused, never loaded."""
    head = io.BytesIO(memoryview(buf)[: min(len(buf), 1 << 16)])
    version = np.lib.format.read_magic(head)
    read_header = (
        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed (they would need unpickling)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(buf) - head.tell() != count * dtype.itemsize:
        raise ValueError(f"array data has {len(buf) - head.tell()} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(buf, dtype, count, offset=head.tell()).reshape(shape, order="F" if fortran else "C")


def iter_wds(
    path: Path, start: int = 0, stop: int | None = None, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, Sample]]:
    """(index in shard, sample) for samples [start, stop) of one tar, in stored order.

    Members of samples before `start` or rejected by `keep(index)` are skipped unread (tar headers
    only), so starting at an offset costs little.
    """
    path = Path(path)
    fields: dict = {}
    index, current = -1, None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            fd = fh.fileno()
            for member in tar:
                key, _, rest = member.name.partition(".")
                if key != current:
                    if current is not None and fields:
                        yield index, _sample(path, current, fields)
                    current, fields, index = key, {}, index + 1
                    if stop is not None and index >= stop:
                        return
                if index < start or not member.isfile() or (keep is not None and not keep(index)):
                    continue
                if rest == "json":
                    fields["meta"] = json.loads(_pread(fd, member.offset_data, member.size))
                elif rest.endswith(".npy") and rest[:-4] in ARRAY_FIELDS:
                    fields[rest[:-4]] = _npy(_pread(fd, member.offset_data, member.size))
                # anything else is not ours: never decoded
            if current is not None and fields:
                yield index, _sample(path, current, fields)
    except (tarfile.TarError, ValueError, OSError, EOFError, KeyError, TypeError) as e:
        raise RegionSpotError(
            f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set"
        ) from e


def read_wds(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples [start, stop) of one tar shard, in stored order."""
    for _, sample in iter_wds(path, start, stop):
        yield sample


def _sample(path: Path, key: str, fields: dict) -> Sample:
    missing = [n for n in ("meta", *ARRAY_FIELDS) if n not in fields]
    if missing:
        raise RegionSpotError(f"{path}: sample {key!r} lacks {', '.join(missing)}")
    meta = fields.pop("meta")
    return Sample(**{n: meta[n] for n in META_FIELDS}, **fields, masks=meta.get("masks"))
