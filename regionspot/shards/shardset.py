"""`ShardSet`: a shard set read through its manifest, refusing mismatches before any work starts."""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.identity import Wanted, flatten, mismatch
from regionspot.shards.index import read_index
from regionspot.shards.location import Location
from regionspot.shards.manifest import MANIFEST, read_manifest
from regionspot.shards.schema import TEXT_DTYPE, Sample, record_name
from regionspot.shards.storage import ShardReader, open_reader

# Fields that decide what the features are, named first; weights hashes and tags/paths follow, since
# they explain a fingerprint difference only when no model field does.
_WHY_LAST = ("weights_sha256", "pretrained", "checkpoint")
_NEVER = ("fingerprint", "imported")  # and how the backbones ran: "runtime.*"
_OPEN_READERS = 16  # shard readers a ShardSet keeps (each holds its index and an open file)


def backbone_differences(a: dict, b: dict) -> list[str]:
    """How two manifests' "backbones" sections differ, as "clip.model differs: X vs Y" phrases:
    model fields (model, tokens, image_size, width, ...) first, then weights hashes and tags."""
    fa, fb = flatten(a), flatten(b)
    keys = [k for k in sorted(set(fa) | set(fb)) if not k.endswith(_NEVER) and not k.startswith("runtime.") and fa.get(k) != fb.get(k)]
    keys.sort(key=lambda k: k.endswith(_WHY_LAST))
    return [f"{k} differs: {fa.get(k)} vs {fb.get(k)}" for k in keys]


class ShardSet:
    """The shard set at `path` (a directory, a URL such as `s3://bucket/sets/o365`, or a `Location`
    carrying storage options), read through its manifest (nothing else is opened yet).

    Attributes: manifest (dict), location, path (the directory as a `Path`; for a URL the Location),
    vocabulary (list of {id, name, synonyms, frequency}), fingerprint, backbones (the manifest
    section), logit_scale, num_images, num_regions, shard_names, shard_paths (the shards' files, for a
    set on local disk), shard_samples (images per shard, manifest order), tokens (T), storage.
    Raises RegionSpotError when the manifest is missing, malformed, of format version 1 (no per-sample
    index: the message names `regionspot shards reindex`), or lists shards that are missing.
    """

    def __init__(self, path: Path | str | Location):
        self.location = Location.parse(path)
        self.path: Path | Location = self.location.local_path if self.location.is_local else self.location
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self.manifest = read_manifest(self.location)
        try:
            self.vocabulary: list[dict] = self.manifest["vocabulary"]
            self.backbones: dict = self.manifest["backbones"]
            self.fingerprint: str = self.backbones["fingerprint"]
            self.logit_scale = float(self.backbones["clip"]["logit_scale"])
            self.tokens = int(self.backbones["sam"]["tokens"])
            self.storage: str = self.manifest["storage"]
            self.num_images = int(self.manifest["dataset"]["images"])
            self.num_regions = int(self.manifest["dataset"]["regions"])
            self.shard_names: list[str] = [s["name"] for s in self.manifest["shards"]]
            self.shard_samples = [int(s["samples"]) for s in self.manifest["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise RegionSpotError(
                f"{self.location.display(MANIFEST)}: malformed manifest (field {e} missing or invalid); "
                "re-run the extraction that wrote it"
            ) from e
        present = set(self.location.list("shard-*"))  # one listing, not a request per shard ...
        # ... where there is one: an https server may list nothing, so what it leaves out is asked for
        missing = [n for n in self.shard_names if n not in present and not self.location.exists(n)]
        if missing:
            raise RegionSpotError(
                f"{self.path}: {len(missing)} shard(s) listed in the manifest are missing (first: {missing[0]}); "
                "re-run the extraction that wrote it"
            )

    @property
    def shard_paths(self) -> list[Path]:
        """The shards' files, in manifest order (a set on local disk; a URL's shards are read through
        `reader`, sample by sample)."""
        if not self.location.is_local:
            raise RegionSpotError(f"{self.location}: its shards are objects at a URL, not local files")
        return [self.path / n for n in self.shard_names]

    @property
    def name(self) -> str:
        return self.manifest["dataset"]["name"]

    def __repr__(self) -> str:
        return f"ShardSet({str(self.path)!r}, images={self.num_images}, regions={self.num_regions})"

    @cached_property
    def _text(self) -> np.ndarray:
        name = self.manifest["text_embeddings"]["file"]
        file = self.location.display(name)
        try:
            data = self.location.read_bytes(name)
        except (FileNotFoundError, IsADirectoryError):
            raise RegionSpotError(f"{file} is missing; re-run the extraction that wrote {self.path}") from None
        try:
            text = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise RegionSpotError(
                f"{file}: unreadable ({e}); re-run the extraction that wrote {self.path}"
            ) from e
        if text.dtype != TEXT_DTYPE or text.ndim != 2 or text.shape[0] != len(self.vocabulary):
            raise RegionSpotError(
                f"{file}: {text.dtype}{list(text.shape)}, expected {TEXT_DTYPE} [{len(self.vocabulary)}, D]"
            )
        return text

    def mismatch(self, want: Wanted) -> str | None:
        """Why this set does not serve `want` (a short phrase naming the field), or None when it does."""
        return mismatch(self.manifest, want)

    def text_embeddings(self) -> np.ndarray:
        """float32 [K, D], L2-normalised; row k is vocabulary entry k."""
        return self._text

    def reader(self, shard: int) -> ShardReader:
        """Indexed reads of shard `shard` (manifest order) through its record's per-sample index: one read
        per sample, checked (checksum, shapes and dtypes against the backbones, labels against the
        vocabulary); faults name the shard, the sample and `regionspot shards verify`.

        Raises:
            RegionSpotError when the record is missing, holds no index or one that does not fit the manifest.
            ShardFault when the shard is shorter than its index (truncated).
        """
        reader = self._readers.get(shard)
        if reader is not None:
            self._readers.move_to_end(shard)
            return reader
        name, record = self.manifest["shards"][shard]["name"], record_name(shard)
        reindex = f"run 'regionspot shards reindex {self.path}'"
        try:
            layout, entries = read_index(
                json.loads(self.location.read_bytes(record)), self.location.display(record), self.shard_samples[shard], reindex
            )
        except (OSError, ValueError) as e:  # missing, unreadable or not JSON
            raise RegionSpotError(f"{self.location.display(record)}: unreadable ({e}); {reindex}") from e
        clip_width = self.backbones["clip"].get("width")
        if layout and (layout["tokens"] != self.tokens or (clip_width and layout["clip_map"][1] != clip_width)):
            raise RegionSpotError(
                f"{self.location.display(record)}: samples of T={layout['tokens']}, CLIP map {layout['clip_map']}; the manifest "
                f"says T={self.tokens}, width {clip_width}; run 'regionspot shards verify {self.path}'"
            )
        reader = open_reader(self.location, name, layout, entries, vocabulary=len(self.vocabulary),
                             fix=f"run 'regionspot shards verify {self.path}'")  # fmt: skip
        self._readers[shard] = reader
        if len(self._readers) > _OPEN_READERS:
            self._readers.popitem(last=False)
        return reader

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_readers": OrderedDict()}  # readers hold open files: rebuilt where used

    def iter_samples(self, shard_indices: Sequence[int] | None = None) -> Iterator[Sample]:
        """The samples of the given shards (default: all), in manifest order, each read and checked
        through the index (`reader`)."""
        indices = range(len(self.shard_names)) if shard_indices is None else shard_indices
        for i in indices:
            reader = self.reader(i)
            for k in range(len(reader)):
                yield reader.read(k)

    def check_fingerprint(
        self,
        fingerprint: str | dict | ShardSet,
        against: str = "the checkpoint",
        backbones: dict | None = None,
    ) -> None:
        """Refuse features from other backbones than `against`'s, naming the fields that differ.

        Args:
            fingerprint: the other side's backbones fingerprint, or its whole "backbones" section
                (a dict with "fingerprint"), or another ShardSet (e.g. one it is mixed with).
            against: how the message names the other side ("the checkpoint", "--init", ...).
            backbones: the other side's "backbones" section when `fingerprint` is a string; with it
                (or a dict / ShardSet) the message names each differing field.
        Raises:
            RegionSpotError when the fingerprints differ.
        """
        if isinstance(fingerprint, ShardSet):
            if against == "the checkpoint":
                against = str(fingerprint.path)
            fingerprint, backbones = fingerprint.fingerprint, fingerprint.backbones
        elif isinstance(fingerprint, dict):
            fingerprint, backbones = fingerprint.get("fingerprint"), fingerprint
        if fingerprint == self.fingerprint:
            return
        detail = ""
        if backbones is not None:
            diffs = backbone_differences(self.backbones, backbones)
            detail = f" ({'; '.join(diffs)})" if diffs else " (same models, different weights)"
        raise RegionSpotError(
            f"{self.path} was extracted with other backbones than {against}{detail}: backbones fingerprint "
            f"{str(self.fingerprint)[:12]} vs {str(fingerprint)[:12]}; extract with the same backbones"
        )


def find_shardsets(root: Path | str | Location, depth: int = 2) -> list[Path | Location]:
    """The finished shard sets (those with a manifest) one to `depth` levels under `root` (a directory, a
    URL or a Location), sorted: `Path`s for local ones, `Location`s for URLs. The inside of a set (its
    own folder, its shards) is not searched."""
    found: list[Location] = []

    def search(where: Location, level: int) -> None:
        for name in where.list():
            if name.startswith((".", "shard-")):
                continue
            child = where.child(name)
            if child.exists(MANIFEST):
                found.append(child)
            elif level < depth:
                search(child, level + 1)

    search(Location.parse(root), 1)
    found.sort(key=lambda s: s.display().split("/"))  # part by part, as paths sort
    return [s.local_path if s.is_local else s for s in found]


def check_mixable(sets: Sequence[ShardSet]) -> None:
    """Refuse shard sets that cannot be trained together: another backbones fingerprint than the
    first set's (naming the differing fields) or an empty set."""
    for s in sets:
        if s.num_images == 0:
            raise RegionSpotError(f"{s.path}: the shard set holds no images; extract a non-empty dataset")
    for s in sets[1:]:
        s.check_fingerprint(sets[0], against=str(sets[0].path))
