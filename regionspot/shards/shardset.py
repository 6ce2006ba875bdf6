"""`ShardSet`: a shard set read through its manifest, refusing mismatches before any work starts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.shards.manifest import read_manifest
from regionspot.shards.schema import Sample
from regionspot.shards.storage import read_shard


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def backbone_differences(a: dict, b: dict) -> list[str]:
    """The fields in which two manifests' "backbones" sections differ (paths and tags excluded)."""
    ignore = ("pretrained", "checkpoint", "weights_sha256", "fingerprint", "imported")
    fa, fb = _flatten(a), _flatten(b)
    return [
        f"{k} differs: {fa.get(k)} vs {fb.get(k)}"
        for k in sorted(set(fa) | set(fb))
        if not k.endswith(ignore) and fa.get(k) != fb.get(k)
    ]


class ShardSet:
    """The shard set in directory `path`.

    Attributes: manifest (dict), path, vocabulary (list of {id, name, synonyms, frequency}),
    fingerprint, backbones (the manifest section), logit_scale, num_images, num_regions, shard_paths.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.vocabulary: list[dict] = self.manifest["vocabulary"]
        self.backbones: dict = self.manifest["backbones"]
        self.fingerprint: str = self.backbones["fingerprint"]
        self.logit_scale = float(self.backbones["clip"]["logit_scale"])
        self.num_images = int(self.manifest["dataset"]["images"])
        self.num_regions = int(self.manifest["dataset"]["regions"])
        self.shard_paths = [self.path / s["name"] for s in self.manifest["shards"]]
        missing = [p.name for p in self.shard_paths if not p.exists()]
        if missing:
            raise RegionSpotError(
                f"{self.path}: {len(missing)} shard(s) listed in the manifest are missing (first: {missing[0]}); "
                "re-run the extraction that wrote it"
            )

    @property
    def name(self) -> str:
        return self.manifest["dataset"]["name"]

    def __repr__(self) -> str:
        return f"ShardSet({str(self.path)!r}, images={self.num_images}, regions={self.num_regions})"

    @cached_property
    def _text(self) -> np.ndarray:
        file = self.path / self.manifest["text_embeddings"]["file"]
        if not file.is_file():
            raise RegionSpotError(f"{file} is missing; re-run the extraction that wrote {self.path}")
        text = np.load(file, allow_pickle=False)
        if text.dtype != np.float32 or text.ndim != 2 or text.shape[0] != len(self.vocabulary):
            raise RegionSpotError(
                f"{file}: {text.dtype}{list(text.shape)}, expected float32 [{len(self.vocabulary)}, D]"
            )
        return text

    def text_embeddings(self) -> np.ndarray:
        """float32 [K, D], L2-normalised; row k is vocabulary entry k."""
        return self._text

    def iter_samples(self, shard_indices: Sequence[int] | None = None) -> Iterator[Sample]:
        """The samples of the given shards (default: all), in manifest order."""
        indices = range(len(self.shard_paths)) if shard_indices is None else shard_indices
        for i in indices:
            yield from read_shard(self.shard_paths[i])

    def check_fingerprint(
        self, fingerprint: str, against: str = "the checkpoint", backbones: dict | None = None
    ):
        """Refuse features from other backbones than `against`'s, naming the field that differs."""
        if fingerprint == self.fingerprint:
            return
        detail = ""
        if backbones is not None:
            diffs = backbone_differences(self.backbones, backbones)
            detail = f" ({'; '.join(diffs)})" if diffs else " (same models, different weights)"
        raise RegionSpotError(
            f"{self.path} was extracted with other backbones than {against}{detail}: backbones fingerprint "
            f"{self.fingerprint[:12]} vs {fingerprint[:12]}; extract with the same backbones"
        )
