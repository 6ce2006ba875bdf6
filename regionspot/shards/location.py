"""Where a shard set lives: a local directory or an fsspec URL, and the only code that touches either.

A `Location` is a shard-set root (or a folder of sets). Everything the writers, readers and `verify`
do to the objects under it goes through its few methods, named by a `name` relative to the root
(`"manifest.json"`, `"shard-000003.tar"`, `"o365/manifest.json"`):

    loc = Location.parse("s3://bucket/sets/o365", storage_options=None)   # or "shards/o365", a Path
    loc.exists("manifest.json"); loc.list("shard-*.json"); loc.read_bytes("manifest.json")
    loc.read_range("shard-000000.tar", offset, length)                    # one ranged GET / one pread
    with loc.open_read("shard-000000.tar") as f: ...                       # large sequential reads
    loc.write_bytes_atomic("shard-000000.json", data)                      # tmp + rename / one PUT
    tmp = loc.scratch_path("shard-000000.tar"); ...; loc.upload(tmp, "shard-000000.tar")

What it owns:
- Local paths (and `file://` URLs) stay plain files: `os` calls, no fsspec, no retries, atomic
  renames. `local_path` hands the `Path` to code that must stay on files.
- URLs (`s3://` via s3fs, `gs://` via gcsfs, `https://` read-only via aiohttp) go through fsspec. A
  missing protocol package is one line naming the extra to install. Credentials and endpoints come
  from the protocol's own conventions (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `~/.aws`, gcloud's
  files) plus `storage_options`; messages show the URL only, never an option's value.
- An object is complete or absent: a write is one PUT (a multipart upload appears when complete), so
  writing a shard and then its record keeps "a record exists" meaning "the shard is complete".
- Transient faults of an object store (a dropped connection, a 5xx, a timeout) are retried here, with
  exponential backoff, `tries` times in all; then a `RegionSpotError` names the object and the tries.
  s3's own client retries are off unless `storage_options` has `config_kwargs`, so `tries` is the
  number of requests made. A missing object is `FileNotFoundError`; any other failure one line.
- A Location pickles (for DataLoader workers) and rebuilds its fsspec client in a forked process,
  whose inherited client would be bound to the parent's event loop.
"""

from __future__ import annotations

import errno
import functools
import importlib
import io
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, BinaryIO

from regionspot.errors import RegionSpotError
from regionspot.shards.locks import process_alive

log = logging.getLogger(__name__)

# protocol -> (package fsspec needs, the regionspot extra that installs it)
PROTOCOLS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "http"),
    "https": ("aiohttp", "http"),
}
READ_ONLY = ("http", "https")
SECRET_WORDS = ("key", "secret", "token", "password")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_USERINFO = re.compile(r"(://)[^/@\s]+@")
_QUERY = re.compile(r"(://[^\s?]*)\?\S*")
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
_jitter = random.Random()  # private: the training RNGs (python's global one included) stay untouched


def path_or_url(where: str | os.PathLike) -> Path | str:
    """`where` as configs keep it: a `Path` for a local path, the text itself for a URL (a `Path` would
    fold its `//`)."""
    return str(where) if not isinstance(where, os.PathLike) and _URL.match(str(where)) else Path(where)


def mask_options(options: dict) -> dict:
    """`options` with the value of every key naming a secret (key, secret, token, password) as '***'."""
    out = {}
    for k, v in options.items():
        secret = any(w in str(k).lower() for w in SECRET_WORDS)
        out[k] = "***" if secret else mask_options(v) if isinstance(v, dict) else v
    return out


def _mask_url(text: str) -> str:
    """`text` with the credentials and query strings of its URLs hidden (`https://***@host/x?...`)."""
    return _QUERY.sub(r"\1?...", _USERINFO.sub(r"\1***@", text))


class Location:
    """A shard-set root: a local directory or an fsspec URL (build one with `Location.parse`)."""

    def __init__(
        self,
        root: Path | str,
        protocol: str = "file",
        storage_options: dict | None = None,
        tries: int = 4,
        backoff_s: float = 0.5,
    ):
        self.protocol = protocol
        self.storage_options = dict(storage_options or {})
        self.tries, self.backoff_s = max(1, int(tries)), float(backoff_s)
        self._root = Path(root) if protocol == "file" else str(root).rstrip("/")
        self._fs, self._fs_pid = None, None

    @classmethod
    def parse(
        cls,
        where: str | os.PathLike | Location,
        storage_options: dict | None = None,
        tries: int = 4,
        backoff_s: float = 0.5,
    ) -> Location:
        """The location `where` names: a local path (str or Path), a `file://` URL, or an fsspec URL.

        Args:
            where: `shards/o365`, `file:///data/shards/o365`, `s3://bucket/prefix`, `gs://...`,
                `https://host/path` (read-only). A Location is returned as it is.
            storage_options: passed to the fsspec filesystem (`endpoint_url`, `key`, `profile`, ...);
                ignored for a local path.
            tries: attempts per remote operation before a transient fault stops the run.
            backoff_s: the first wait between attempts; each later wait doubles (capped at 8 s).

        Raises:
            RegionSpotError: an unknown protocol, or one whose package is not installed (naming the
                extra: `pip install "regionspot[s3]"`).
        """
        if isinstance(where, Location):
            return where
        if isinstance(where, os.PathLike) or not _URL.match(str(where)):
            return cls(Path(where), tries=tries, backoff_s=backoff_s)
        url = str(where)
        protocol = _URL.match(url).group(1).lower()
        if protocol in ("file", "local"):
            return cls(Path(url.split("://", 1)[1]), tries=tries, backoff_s=backoff_s)
        _require(protocol, url)
        return cls(url, protocol, storage_options, tries, backoff_s)

    # --- what it is

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def read_only(self) -> bool:
        return self.protocol in READ_ONLY

    @property
    def local_path(self) -> Path:
        """The directory, for code that must stay on files; a URL raises RegionSpotError."""
        if not self.is_local:
            raise RegionSpotError(
                f"{self}: this needs a local directory, not a URL; copy the set to disk first"
            )
        return self._root

    @property
    def name(self) -> str:
        """The last component of the root (a shard set's name)."""
        return self._root.name if self.is_local else self._root.rsplit("/", 1)[-1]

    def child(self, name: str) -> Location:
        """The location `name` below this one (a set inside a folder of sets), on the same client."""
        out = Location(self._join(name), self.protocol, self.storage_options, self.tries, self.backoff_s)
        out._fs, out._fs_pid = self._fs, self._fs_pid
        return out

    def url(self, name: str = "") -> str:
        """The full URL (or local path) of `name`, to hand to another fsspec-based library with
        `storage_options` (zarr's `FsspecStore.from_url`); messages use `str()`, which hides credentials."""
        return str(self._join(name))

    def display(self, name: str = "") -> str:
        """How messages name `name` (default: the root): its path, or its URL with credentials hidden."""
        return self._show(name)

    def __str__(self) -> str:
        return str(self._root) if self.is_local else _mask_url(self._root)

    def __repr__(self) -> str:
        options = f", storage_options={mask_options(self.storage_options)}" if self.storage_options else ""
        return f"Location({str(self)!r}{options})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.protocol, self._root) == (other.protocol, other._root)

    def __hash__(self) -> int:
        return hash((self.protocol, self._root))

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_fs": None, "_fs_pid": None}  # a client does not cross processes

    # --- reading

    def exists(self, name: str) -> bool:
        """Whether the object (or, for a zarr shard, the directory) `name` exists."""
        if self.is_local:
            return self._path(name).exists()

        def info() -> bool:
            try:
                self.fs.info(self._join(name))
                return True
            except FileNotFoundError as e:
                if _transient(e.__cause__):  # fsspec's http reports any failure of HEAD and GET so
                    raise
                return False

        return self._retry("exists", name, info)

    def list(self, pattern: str = "*") -> list[str]:
        """Names of this location's direct children matching the glob `pattern`, sorted (empty when
        the location does not exist). Each call lists afresh: other ranks may have written since."""
        if self.is_local:
            try:
                names = [e.name for e in os.scandir(self._root)]
            except (FileNotFoundError, NotADirectoryError):
                names = []
        else:

            def ls() -> list[str]:
                try:
                    return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._root, detail=False)]
                except FileNotFoundError:
                    return []

            names = self._retry("list", "", ls)
        return sorted(n for n in names if fnmatchcase(n, pattern))

    def files(self, name: str) -> list[str]:
        """The files below the directory `name` (a zarr shard), as names relative to it (`c/0/0`),
        sorted part by part as `pathlib` sorts paths; empty when there are none."""
        if self.is_local:
            root = self._path(name)
            return [p.relative_to(root).as_posix() for p in sorted(p for p in root.rglob("*") if p.is_file())]
        prefix = f"{self._join(name)}/"
        found = self._retry("list", name, self.fs.find, prefix)
        # s3fs may answer without the protocol; the part after the prefix's bucket-relative path is the name
        bare = prefix.split("://", 1)[1]
        names = [p.split("://", 1)[-1][len(bare) :] for p in found]
        return sorted((n for n in names if n), key=lambda n: n.split("/"))

    def size(self, name: str) -> int:
        """Bytes of the object `name`."""
        if self.is_local:
            return self._path(name).stat().st_size
        size = self._retry("size", name, self.fs.size, self._join(name))
        if size is None:  # an http server that sends no Content-Length
            raise RegionSpotError(
                f"{self._show(name)}: the server does not report the size; copy the set to disk"
            )
        return int(size)

    def read_bytes(self, name: str) -> bytes:
        """The whole object `name` (for small ones: records, the manifest, text embeddings)."""
        if self.is_local:
            return self._path(name).read_bytes()
        return self._retry("read", name, self.fs.cat_file, self._join(name))

    def read_range(self, name: str, offset: int, length: int) -> bytes | bytearray:
        """`length` bytes of `name` from byte `offset`: one ranged GET, or one `preadv` into a writable
        bytearray locally (so arrays built on it need no copy).

        Raises:
            EOFError: the object ends before offset + length (a truncated shard).
        """
        if length <= 0:
            return b""
        if self.is_local:
            buf = bytearray(length)
            fd = os.open(self._path(name), os.O_RDONLY)
            try:
                got = 0
                while got < length:  # preadv may return fewer bytes on huge reads; 0 means end of file
                    n = os.preadv(fd, [memoryview(buf)[got:]], offset + got)
                    if n == 0:
                        break
                    got += n
            finally:
                os.close(fd)
        else:
            buf = self._retry(
                "read", name, self.fs.cat_file, self._join(name), start=offset, end=offset + length
            )
            got = len(buf)
            if got > length:
                raise RegionSpotError(
                    f"{self._show(name)}: the server ignores range requests; copy the set to disk"
                )
        if got < length:
            raise EOFError(
                f"{self._show(name)}: {got} of {length} bytes at offset {offset}; the object ends early"
            )
        return buf

    def open_read(self, name: str, block_size: int = 16 << 20) -> BinaryIO:
        """A binary file for large sequential reads of `name` (a context manager). Remote: reads of
        `block_size` bytes, each one ranged GET retried like `read_range`; seeking is allowed."""
        if self.is_local:
            return open(self._path(name), "rb")
        return io.BufferedReader(_RangeFile(self, name), buffer_size=block_size)

    # --- writing

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        """Write the object `name` so that readers see all of it or nothing: a temporary file renamed
        into place locally, one PUT on an object store."""
        self._refuse_read_only(name)
        if self.is_local:
            tmp = self.scratch_path(name)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, self._path(name))
            finally:
                tmp.unlink(missing_ok=True)  # only after a failure is it still there
        else:
            self._retry("write", name, self.fs.pipe_file, self._join(name), data)

    def scratch_path(self, name: str) -> Path:
        """A local path, not yet existing, to write `name` at before `upload`: beside its final place
        (so the upload is a rename) for a local location, else in the temporary directory (`TMPDIR`).
        It ends with `name`'s base name, so suffixes still tell the storage."""
        base = name.rsplit("/", 1)[-1]
        token = f".tmp-{os.getpid()}-{_jitter.getrandbits(32):08x}-{base}"
        if self.is_local:
            final = self._path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            return final.with_name(token)
        return Path(tempfile.gettempdir()) / f"regionspot{token}"

    def remove_stale_scratch(self, name: str) -> list[Path]:
        """Remove the scratch copies of `name` (`scratch_path`) that a killed process of this machine left
        in the temporary directory; returns what was removed. A live process's copy is left alone."""
        if self.is_local:
            return []  # beside the set: its writer's own clean-up finds them
        base = name.rsplit("/", 1)[-1]
        removed = []
        for path in Path(tempfile.gettempdir()).glob(f"regionspot.tmp-*-{base}"):
            pid = path.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def upload(self, local: Path | str, name: str) -> None:
        """Move the local file or directory `local` to `name`, replacing what is there: a rename
        locally (a copy when it is on another file system), an upload under the final key on an
        object store (a directory file by file), after which `local` is removed."""
        self._refuse_read_only(name)
        local = Path(local)
        if self.is_local:
            _move(local, self._path(name))
            return
        if local.is_dir():
            self.delete(name)  # no stale objects of an earlier, interrupted upload stay under the prefix
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                key = f"{name}/{f.relative_to(local).as_posix()}"
                self._retry("upload", key, self.fs.put_file, str(f), self._join(key))
            shutil.rmtree(local)
        else:
            self._retry("upload", name, self.fs.put_file, str(local), self._join(name))
            local.unlink()

    def delete(self, name: str) -> None:
        """Remove the object or directory `name`; nothing to remove is fine."""
        self._refuse_read_only(name)
        if self.is_local:
            path = self._path(name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            return

        def rm() -> None:
            try:
                self.fs.rm(self._join(name), recursive=True)
            except FileNotFoundError:
                pass

        self._retry("delete", name, rm)

    # --- internals

    @property
    def fs(self):
        """The fsspec filesystem of a URL location, built on first use in each process."""
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            options = {"skip_instance_cache": True, "use_listings_cache": False}  # see others' writes
            own_retries = self.protocol in ("s3", "s3a") and "config_kwargs" not in self.storage_options
            if own_retries:  # botocore's and s3fs' retries off: `tries` counts the requests
                options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
            self._fs = fsspec.filesystem(self.protocol, **(options | self.storage_options))
            if own_retries:
                self._fs.retries = 1
            self._fs_pid = os.getpid()
        return self._fs

    def _check_name(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"{name!r}: a name is relative to the location and stays below it")
        return name

    def _path(self, name: str) -> Path:
        return self._root / self._check_name(name) if name else self._root

    def _join(self, name: str) -> str | Path:
        if self.is_local:
            return self._path(name)
        return f"{self._root}/{self._check_name(name)}" if name else self._root

    def _show(self, name: str) -> str:
        return str(self._path(name)) if self.is_local else _mask_url(str(self._join(name)))

    def _refuse_read_only(self, name: str) -> None:
        if self.read_only:
            raise RegionSpotError(
                f"{self._show(name)}: {self.protocol}:// locations are read-only; write the shard set to a "
                "local directory, s3:// or gs://"
            )

    def _retry(self, what: str, name: str, call: Callable, *args, **kwargs) -> Any:
        """`call(*args, **kwargs)` with bounded retries of transient faults; other failures as one line."""
        where = self._show(name)
        for attempt in range(1, self.tries + 1):
            try:
                return call(*args, **kwargs)
            except RegionSpotError:
                raise
            except Exception as e:
                if isinstance(e, FileNotFoundError) and not _transient(e.__cause__):
                    if what in ("write", "upload"):  # what is missing is the bucket
                        raise RegionSpotError(
                            f"{where}: {what} failed: {_summary(e)}; does the bucket exist?"
                        ) from e
                    raise FileNotFoundError(errno.ENOENT, "no such object", where) from None
                if not _transient(e):
                    hint = "; check the credentials" if isinstance(e, PermissionError) else ""
                    raise RegionSpotError(f"{where}: {what} failed: {_summary(e)}{hint}") from e
                if attempt == self.tries:
                    raise RegionSpotError(
                        f"{where}: {what} failed after {self.tries} tries ({_summary(e)}); the store is "
                        "unreachable or failing: check the endpoint and run the command again"
                    ) from e
                delay = min(8.0, self.backoff_s * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
                log.warning(
                    "%s: %s failed (%s); try %d of %d in %.1f s",
                    where,
                    what,
                    _summary(e),
                    attempt + 1,
                    self.tries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


class _RangeFile(io.RawIOBase):
    """A seekable read-only file over an object's ranged reads (each retried by its Location)."""

    def __init__(self, location: Location, name: str):
        self._loc, self._name = location, name
        self._size, self._pos = location.size(name), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        buffer[:n] = self._loc.read_range(self._name, self._pos, n)
        self._pos += n
        return n


def _require(protocol: str, url: str) -> None:
    """Import the package `protocol` needs, or say in one line which extra installs it."""
    import fsspec

    if protocol not in fsspec.available_protocols():
        raise RegionSpotError(
            f"{_mask_url(url)}: unknown protocol {protocol!r}; use a local path, s3://, gs://, https:// or file://"
        )
    package, extra = PROTOCOLS.get(protocol, (None, None))
    try:
        if package:
            importlib.import_module(package)
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        fix = f'pip install "regionspot[{extra}]"' if extra else f"install the package fsspec names ({e})"
        raise RegionSpotError(
            f"{_mask_url(url)}: {protocol}:// needs {package or 'a package'}, which is not installed; {fix}"
        ) from None


def _move(src: Path, dest: Path) -> None:
    """Rename `src` to `dest` (replacing it); across file systems copy beside `dest`, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)  # os.replace cannot replace a non-empty directory
    try:
        os.replace(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    if src.is_dir():
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
        shutil.rmtree(src)
    else:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        src.unlink()


def _transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a network fault worth another try."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _transient_types()):
            return True
        response = getattr(exc, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in _TRANSIENT_STATUS or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
                return True
        status = getattr(exc, "status", None)  # aiohttp's ClientResponseError
        if not isinstance(status, int):
            status = getattr(exc, "code", None)  # gcsfs' HttpError
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    import http.client

    from fsspec.exceptions import FSTimeoutError

    types: list[type[BaseException]] = [
        ConnectionError,
        TimeoutError,
        http.client.IncompleteRead,
        FSTimeoutError,
    ]
    try:
        import botocore.exceptions as boto

        types += [boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


def _summary(exc: BaseException) -> str:
    """One short line for `exc`, with credentials in URLs hidden."""
    text = " ".join(str(exc).split())[:200]
    return _mask_url(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
