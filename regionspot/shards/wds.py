"""webdataset storage: `shard-NNNNNN.tar`, one `<key>.json` and one `<key>.<field>.npy` per field per image.

Reading: any tar reader works (`tar tf shard-000000.tar`); in Python, `read_wds(path)` yields
`Sample`s. Only the member names of the schema are decoded, arrays with `allow_pickle=False`; the
default webdataset decoders are never used (they would unpickle `.pyd` / `.pth` members).
Tars are reproducible: fixed mtime, owner and mode, members in sample order, so the same samples
give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.schema import ARRAY_FIELDS, META_FIELDS, Sample


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class WdsShardWriter:
    """Writes one tar under a temporary name; `close()` renames it into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, sample: Sample) -> None:
        meta = json.dumps(sample.meta(), sort_keys=True, separators=(",", ":")).encode()
        self._add(f"{sample.key}.json", meta)
        for name, array in sample.arrays().items():
            self._add(f"{sample.key}.{name}.npy", _npy_bytes(array))

    def close(self) -> None:
        self._tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def read_wds(path: Path) -> Iterator[Sample]:
    """Yield the samples of one tar shard in stored order."""
    path = Path(path)
    fields: dict = {}
    current = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, rest = member.name.partition(".")
                if key != current:
                    if current is not None:
                        yield _sample(path, current, fields)
                    current, fields = key, {}
                data = tar.extractfile(member).read()
                if rest == "json":
                    fields["meta"] = json.loads(data)
                elif rest.endswith(".npy") and rest[:-4] in ARRAY_FIELDS:
                    fields[rest[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
                # anything else is not ours: never decoded
            if current is not None:
                yield _sample(path, current, fields)
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        raise RegionSpotError(
            f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set"
        ) from e


def _sample(path: Path, key: str, fields: dict) -> Sample:
    missing = [n for n in ("meta", *ARRAY_FIELDS) if n not in fields]
    if missing:
        raise RegionSpotError(f"{path}: sample {key!r} lacks {', '.join(missing)}")
    meta = fields.pop("meta")
    return Sample(**{n: meta[n] for n in META_FIELDS}, **fields, masks=meta.get("masks"))
