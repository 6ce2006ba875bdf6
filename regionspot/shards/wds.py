"""webdataset storage: `shard-NNNNNN.tar`, one `<key>.json` and one `<key>.<field>.npy` per field per image.

Reading: any tar reader works (`tar tf shard-000000.tar`); in Python, `WdsReader` reads a sample with one
read through the per-sample index of the shard's record (shards/index.py), and `storage.read_shard(path)`
yields the `Sample`s of a bare tar (it walks the tar headers first, `scan_wds`). Only the member names of the schema are decoded,
arrays with `allow_pickle=False` semantics (an object dtype is refused); the default webdataset decoders
are never used (they would unpickle `.pyd` / `.pth` members). Tars are reproducible: fixed mtime, owner and
mode, members in sample order and field order, so the same samples give the same bytes.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.index import CHECKSUM, MEMBERS, IndexedShard, checksum, hasher, make_layout, mismatch
from regionspot.shards.location import Location
from regionspot.shards.schema import (
    META_FIELDS,
    STORED_DTYPES,
    Sample,
    ShardGuard,
    field_shapes,
    json_default,
)

_BLOCK = tarfile.BLOCKSIZE  # tar members start on 512-byte blocks


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class _Tap:
    """The tar's file object: passes writes through, counting the bytes and checksumming them, so the
    per-sample index costs no second pass over the data."""

    def __init__(self, file):
        self.file, self.pos, self.hash = file, 0, hasher()

    def write(self, data) -> int:
        self.file.write(data)
        self.pos += len(data)
        self.hash.update(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


class WdsShardWriter:
    """Writes one tar under a temporary name (`.shard-NNNNNN.tar.tmp-PID`); `close()` renames it into place.

    `entries` is the shard's per-sample index, `layout` its (T, [L, C]) (shards/index.py).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._guard = ShardGuard(self.path)
        self.entries: list[dict] = []
        self._file = open(self.tmp, "wb")  # closed by close() or abort()
        self._tap = _Tap(self._file)
        # PAX: same bytes as ustar for short ASCII names, and still valid for long or non-ASCII keys
        self._tar = tarfile.open(fileobj=self._tap, mode="w", format=tarfile.PAX_FORMAT)

    @property
    def layout(self) -> dict | None:
        return make_layout(self._guard.shapes)

    def _add(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        return self._tap.pos - _padded(len(data))

    def write(self, sample: Sample) -> None:
        """Append one sample: `<key>.json`, then `<key>.<field>.npy` in ARRAY_FIELDS order."""
        self._guard(sample)
        meta = json.dumps(sample.meta(), sort_keys=True, separators=(",", ":"), default=json_default).encode()
        start, self._tap.hash = self._tap.pos, hasher()
        members = [(self._add(f"{sample.key}.json", meta), len(meta))]
        for name, array in sample.arrays().items():
            data = _npy_bytes(array)
            members.append((self._add(f"{sample.key}.{name}.npy", data), len(data)))
        self.entries.append({
            "key": sample.key, "regions": sample.num_regions, CHECKSUM: self._tap.hash.intdigest(), "offset": start,
            "length": self._tap.pos - start, "members": [[offset - start, size] for offset, size in members],
        })  # fmt: skip

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished tar, also when closing it fails (a full disk fails the end blocks too)."""
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except OSError:  # the failure being aborted (a full disk fails the flush too); the tmp goes below
                pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> WdsShardWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.abort() if kind is not None else self.close()


# --- reading ------------------------------------------------------------------------------------------

_HEADERS: dict[bytes, tuple] = {}  # .npy header bytes -> (shape, dtype): a shard repeats a few headers


def _parse_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the whole .npy header `raw`, parsed once per distinct header with numpy's header
    reader (a literal, never a pickle); object dtypes and Fortran order are refused (ValueError)."""
    parsed = _HEADERS.get(raw)
    if parsed is None:
        head = io.BytesIO(raw)
        version = np.lib.format.read_magic(head)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(head)
        if head.tell() != len(raw):
            raise ValueError("its .npy header does not end where its data starts")
        if dtype.hasobject:
            raise ValueError("holds Python objects (they would need unpickling); refused")
        if fortran and len(shape) > 1:
            raise ValueError("is stored in Fortran order; the writer stores C order")
        if len(_HEADERS) > 4096:
            _HEADERS.clear()
        parsed = _HEADERS[raw] = (tuple(shape), dtype)
    return parsed


def npy_header(buf: np.ndarray) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of the .npy bytes starting `buf` (a uint8 array).

    Raises:
        ValueError naming what is wrong (bad magic, an unread version, a header longer than `buf`, an
        object dtype, Fortran order).
    """
    prefix = buf[:12].tobytes()
    if len(prefix) < 12 or prefix[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array (bad magic)")
    if prefix[6] not in (1, 2):
        raise ValueError(f".npy format version {prefix[6]} is not read")
    total = (
        10 + int.from_bytes(prefix[8:10], "little")
        if prefix[6] == 1
        else 12 + int.from_bytes(prefix[8:12], "little")
    )
    if total > len(buf):
        raise ValueError(f".npy header of {total} bytes, {len(buf)} available")
    return (*_parse_header(buf[:total].tobytes()), total)


def _preadv_all(fd: int, views: list[np.ndarray], offset: int, length: int) -> None:
    """Fill `views` (writable C-contiguous arrays, `length` bytes in all) from consecutive bytes of `fd` at
    `offset`: one `preadv` (more only if the kernel returns early)."""
    got = os.preadv(fd, views, offset)
    if got == length:
        return
    rest = [v.reshape(-1).view(np.uint8) for v in views]
    while rest:
        if got == 0:
            raise EOFError
        offset += got
        while rest and got >= rest[0].nbytes:
            got -= rest[0].nbytes
            rest = rest[1:]
        if rest:
            rest[0] = rest[0][got:]
            got = os.preadv(fd, rest, offset)


@functools.cache
def _written_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header `np.save` writes for an array of `shape` and `dtype` (C order)."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.empty(shape, dtype))  # np.empty: never touched
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


@dataclass(frozen=True)
class _Plan:
    """How the samples of one layout are read: those whose array members are where the index says and whose
    .npy headers are the ones `np.save` writes for the indexed shapes (every shard regionspot writes).

    One `preadv` fills, in file order, the destinations' arrays straight and every other byte of the span
    (tar headers and padding, metadata, .npy headers, arrays without a destination) into one scratch buffer;
    one comparison then checks all .npy headers. Samples of one region count (and one array-member layout)
    share a plan, so its bookkeeping is done once, not per sample.
    """

    members: list  # the index entry's array members, as the plan assumes them
    scratch: int  # bytes of the scratch buffer
    pieces: tuple[slice | str, ...]  # per iovec: a slice of the scratch or a destination's name
    headers: tuple[slice, ...]  # the .npy headers in the scratch ...
    expected: bytes  # ... and their bytes as written
    shapes: dict[str, tuple[int, ...]]  # every array's shape
    scratched: tuple[tuple[str, slice], ...]  # (name, its data in the scratch) of the other arrays

    @staticmethod
    def make(e: dict, shapes: dict[str, tuple[int, ...]], into: tuple[str, ...]) -> _Plan | None:
        """The plan of index entry `e` for arrays of `shapes`, those named `into` read into destinations;
        None when its members cannot hold such arrays as written (its headers are then parsed)."""
        pieces: list[slice | str] = []
        headers, expected, scratched = [], [], []
        pos = used = 0  # bytes of the span planned; of them, in the scratch

        def keep(stop: int) -> slice:
            """The span's bytes [pos, stop) into the scratch; returns where they land there."""
            nonlocal pos, used
            landed = slice(used, used + stop - pos)
            if pieces and isinstance(pieces[-1], slice):
                pieces[-1] = slice(pieces[-1].start, landed.stop)
            else:
                pieces.append(landed)
            pos, used = stop, landed.stop
            return landed

        members = e["members"]
        if members[0][0] + members[0][1] > members[1][0]:  # the metadata must precede the arrays
            return None
        for name, (rel, size) in zip(MEMBERS[1:], members[1:], strict=True):
            dtype = STORED_DTYPES[name]
            header = _written_header(shapes[name], dtype)
            if (
                rel < pos
                or rel + size > e["length"]
                or size != len(header) + math.prod(shapes[name]) * dtype.itemsize
            ):
                return None
            keep(rel)
            headers.append(keep(rel + len(header)))
            expected.append(header)
            if name in into:
                pieces.append(name)
                pos = rel + size
            else:
                scratched.append((name, keep(rel + size)))
        keep(e["length"])
        return _Plan([list(m) for m in members[1:]], used, tuple(pieces), tuple(headers), b"".join(expected),
                     shapes, tuple(scratched))  # fmt: skip


_PLANS: dict[tuple, _Plan | None] = {}  # (layout, destinations, regions, span length, first array) -> plan


class WdsReader(IndexedShard):
    """Indexed reads of one tar shard: each sample is one read of its byte range, checked and sliced.

    Args: as `IndexedShard`'s.
    Raises:
        ShardFault (at construction) when the shard ends before its last indexed sample.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._file = None
        self._scratch = np.empty(0, np.uint8)
        if self.entries:
            size = self.location.size(self.name)
            for e in self.entries:
                if e["offset"] + e["length"] > size:
                    raise self.fault(e["key"], f"the shard ends at byte {size}, before this sample's bytes: "
                                               "it is truncated")  # fmt: skip

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_file": None}  # an open file does not cross processes

    def read(self, i: int, verify: bool = True) -> Sample:
        """Sample `i` in memory of its own (its arrays are views of one buffer)."""
        return self._read(i, {}, verify, own=True)

    def read_into(self, i: int, dest: dict[str, np.ndarray], verify: bool = True) -> Sample:
        """Sample `i`, its arrays named in `dest` read straight into those arrays (C-contiguous, of the stored
        dtype and the sample's shapes): one copy, from the file; the others land in a scratch buffer of the
        same read and are copied out.

        Returns the sample: the `dest` arrays, and copies of the other arrays.
        Raises:
            ShardFault: a checksum mismatch (when `verify`), a truncated shard, an array of another shape or
            dtype, a label outside the vocabulary, metadata that is not the indexed sample's.
        """
        e = self.entries[i]
        plan = self._plan(e, tuple(dest)) if self.tokens is not None and "regions" in e else None
        if plan is not None:
            for name, out in dest.items():
                if out.shape != plan.shapes[name]:
                    raise self.fault(
                        e["key"], f"{name} is {list(plan.shapes[name])}, its destination {list(out.shape)}"
                    )
            try:
                sample = self._read_planned(e, plan, dest, verify)
            except (KeyError, TypeError, ValueError) as err:
                raise self.fault(e["key"], f"unreadable ({err})") from err
            if sample is not None:
                return sample
        return self._read(i, dest, verify, own=False)

    def _plan(self, e: dict, into: tuple[str, ...]) -> _Plan | None:
        try:
            members = e["members"]
            # what fixes a plan but the members, then the members compared: cheaper than hashing them
            key = (self.tokens, self.clip_shape, into, e["regions"], e["length"], members[1][0])
            plan = _PLANS.get(key)
            if plan is None or plan.members != members[1:]:
                if len(_PLANS) > 4096:
                    _PLANS.clear()
                shapes = field_shapes(e["regions"], self.tokens, self.clip_shape)
                plan = _PLANS[key] = _Plan.make(e, shapes, into)
        except (KeyError, TypeError, ValueError, IndexError):
            return None  # a malformed entry: the general read names what is wrong
        return plan

    def _read_planned(self, e: dict, plan: _Plan, dest: dict[str, np.ndarray], verify: bool) -> Sample | None:
        """Sample of entry `e` read by `plan`; None when its .npy headers are not as planned."""
        key, (rel, size) = e["key"], e["members"][0]
        if self._scratch.nbytes < plan.scratch:
            self._scratch = np.empty(max(plan.scratch, 2 * self._scratch.nbytes), np.uint8)
        scratch = self._scratch
        views = [scratch[p] if isinstance(p, slice) else dest[p] for p in plan.pieces]
        self._read_span(e, views)
        if verify:
            self._verify(e, views)
        at = memoryview(scratch)
        if b"".join([at[h] for h in plan.headers]) != plan.expected:
            return None
        meta = self._meta(key, scratch[rel : rel + size])  # the first scratch piece starts the span
        arrays = dict(dest)
        for name, data in plan.scratched:
            arrays[name] = scratch[data].view(STORED_DTYPES[name]).reshape(plan.shapes[name]).copy()
        return self._sample(key, meta, arrays)

    def _read(self, i: int, dest: dict[str, np.ndarray], verify: bool, own: bool) -> Sample:
        e = self.entries[i]
        try:
            return self._decode(e, dest, verify, own)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise self.fault(e.get("key", f"#{i}"), f"unreadable ({err})") from err

    def _decode(self, e: dict, dest: dict[str, np.ndarray], verify: bool, own: bool) -> Sample:
        """The general read: the whole span into a buffer, every .npy header parsed and checked (a bare
        shard's samples, whose index has no shapes; a sample not written as planned)."""
        key, length, members = e["key"], e["length"], e["members"]
        if own or self._scratch.nbytes < length:
            span = np.empty(length, np.uint8)
            if not own:
                self._scratch = span
        else:
            span = self._scratch[:length]
        self._read_span(e, [span])
        if verify:
            self._verify(e, [span])
        ends = [0]
        for rel, size in members:
            if rel < ends[-1] or rel + size > length:
                raise self.fault(key, "its index entry is inconsistent (members overlap or leave the span)")
            ends.append(rel + size)
        rel, size = members[0]
        meta = self._meta(key, span[rel : rel + size])
        want = None
        if self.tokens is not None and e.get("regions") is not None:
            want = field_shapes(e["regions"], self.tokens, self.clip_shape)
        arrays = {}
        for name, (rel, size) in zip(MEMBERS[1:], members[1:], strict=True):
            try:
                shape, dtype, header = npy_header(span[rel : rel + size])
            except ValueError as err:
                raise self.fault(key, f"{name}: {err}") from None
            if dtype != STORED_DTYPES[name] or shape != (want[name] if want is not None else shape):
                expected = f"{STORED_DTYPES[name]}{list(want[name]) if want is not None else ''}"
                raise self.fault(key, f"{name} is {dtype}{list(shape)}, expected {expected}")
            nbytes = math.prod(shape) * dtype.itemsize
            if size - header != nbytes:
                raise self.fault(key, f"{name} has {size - header} data bytes, {list(shape)} needs {nbytes}")
            array = span[rel + header : rel + size].view(dtype).reshape(shape)
            out = dest.get(name)
            if out is not None:
                if shape != out.shape:
                    raise self.fault(key, f"{name} is {list(shape)}, its destination {list(out.shape)}")
                out[...] = array
                arrays[name] = out
            else:
                arrays[name] = array if own else array.copy()
        sample = self._sample(key, meta, arrays)
        if want is None and (problems := sample.problems()):
            raise self.fault(key, "; ".join(problems))
        return sample

    def _verify(self, e: dict, views: list[np.ndarray]) -> None:
        """Refuse a span (`views`, in order) whose checksum is not the index's."""
        if (digest := checksum(views)) != e[CHECKSUM]:
            raise self.fault(e["key"], f"{mismatch(digest, e[CHECKSUM])}: its bytes changed since extraction")

    def _meta(self, key: str, raw: np.ndarray) -> dict:
        """The sample's `<key>.json` from its bytes, refused unless it names `key`."""
        meta = json.loads(raw.tobytes())
        if not isinstance(meta, dict) or meta.get("key") != key:
            found = meta.get("key") if isinstance(meta, dict) else meta
            raise self.fault(key, f"its metadata names key {found!r}: the index and the shard disagree")
        return meta

    def _sample(self, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> Sample:
        """The `Sample` of checked metadata and arrays, its labels refused outside the vocabulary."""
        self.check_labels(key, arrays["labels"])
        try:
            return Sample(**{n: meta[n] for n in META_FIELDS}, **arrays, masks=meta.get("masks"))
        except KeyError as err:
            raise self.fault(key, f"its metadata lacks {err}") from None

    def _read_span(self, e: dict, views: list[np.ndarray]) -> None:
        """The entry's byte range into `views`, in order: one `preadv` locally, one ranged GET remotely."""
        try:
            if self.location.is_local:
                if self._file is None:
                    self._file = open(self.location.local_path / self.name, "rb", buffering=0)
                _preadv_all(self._file.fileno(), views, e["offset"], e["length"])
                return
            data = np.frombuffer(self.location.read_range(self.name, e["offset"], e["length"]), np.uint8)
        except EOFError:
            raise self.fault(e["key"], "the shard ends before this sample's bytes: it is truncated") from None
        except OSError as err:
            raise self.fault(e["key"], f"cannot be read ({err})") from err
        used = 0
        for v in views:
            v.reshape(-1).view(np.uint8)[:] = data[used : used + v.nbytes]
            used += v.nbytes


def scan_wds(path: Path, checksums: bool = False) -> tuple[dict | None, list[dict]]:
    """(layout, entries): the per-sample index of a tar as its bytes say, from its member headers.

    Without `checksums` only the headers are read (entries have key, offset, length, members); with them
    every sample's byte range is read once more for its checksum, its region count and the layout.
    """
    path = Path(path)
    members: dict[str, dict[str, tuple[int, int]]] = {}  # key -> member -> (data offset, size)
    spans: dict[str, tuple[int, int]] = {}
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            last = None
            for m in tar:
                key, _, rest = m.name.partition(".")
                name = "json" if rest == "json" else rest[:-4] if rest.endswith(".npy") else None
                if name not in MEMBERS or not m.isfile():
                    continue  # not ours: never decoded
                if key != last and key in members:
                    raise ValueError(f"the members of sample {key!r} are not together")
                last = key
                members.setdefault(key, {})[name] = (m.offset_data, m.size)
                start, end = spans.get(key, (m.offset, 0))
                spans[key] = (min(start, m.offset), max(end, m.offset_data + _padded(m.size)))
    except (tarfile.TarError, OSError, ValueError) as e:
        raise RegionSpotError(
            f"{path}: unreadable shard ({e}); run 'regionspot shards verify' on its set"
        ) from e
    entries = []
    for key, found in members.items():
        missing = [n for n in MEMBERS if n not in found]
        if missing:
            raise RegionSpotError(f"{path}: sample {key!r} lacks {', '.join(missing)}")
        start, end = spans[key]
        entries.append({"key": key, "offset": start, "length": end - start,
                        "members": [[found[n][0] - start, found[n][1]] for n in MEMBERS]})  # fmt: skip
    layout = None
    if checksums:
        reader = WdsReader(Location.parse(path.parent), path.name, None, entries)
        for e in entries:
            span = np.empty(e["length"], np.uint8)
            reader._read_span(e, [span])
            shapes = {}
            for name, (rel, size) in zip(MEMBERS[1:], e["members"][1:], strict=True):
                try:
                    shapes[name] = npy_header(span[rel : rel + size])[0]
                except ValueError as err:
                    raise reader.fault(e["key"], f"{name}: {err}") from None
            e.update(regions=int(shapes["boxes"][0]), **{CHECKSUM: checksum([span])})
            layout = layout or make_layout((shapes["sam_tokens"][1], *shapes["clip_map"]))
    return layout, entries
