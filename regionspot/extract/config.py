"""`ExtractConfig`: everything one extraction run needs, checked before any model is loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location, mask_options, path_or_url

STORAGES = ("wds", "zarr")


@dataclass
class ExtractConfig:
    dataset: str = "toy"
    """Dataset name (o365, v3det, openimages, lvis_val, coco, toy, toy_val) or coco:ANN.json:IMAGES or
    openimages:BOXES.csv:CLASSES.csv:IMAGES."""
    data_root: Path | None = None
    """Root of the named datasets (else $REGIONSPOT_DATASETS, else datasets/)."""
    out: Path | str | None = None
    """Shard set directory or URL (s3://bucket/prefix, gs://..., file://...); default shards/<dataset>,
    or shards/<dataset>-<proposals> with proposals."""
    storage_options: dict | None = None
    """Options of the --out URL's fsspec filesystem (endpoint_url, profile, ...); credentials usually
    come from the protocol's own environment variables and files."""
    backbones: str = "bl"
    """Backbone preset: bb, bl, bl336 or tiny."""
    sam: str | None = None
    sam_checkpoint: str | None = None
    clip: str | None = None
    clip_pretrained: str | None = None
    clip_size: int | None = None
    sam_tokens: int | None = None
    """1: the single-mask token (paper default); 3: the three multimask tokens."""
    masks: bool = False
    """Also store SAM's mask per region (COCO RLE)."""
    storage: str = "wds"
    shard_size: int = 1000
    proposals: Path | None = None
    """A detector's boxes (COCO results list or the official RegionSpot dict); None = annotations."""
    gpus: int | None = None
    """Processes, one per GPU, on this machine (default: all visible GPUs; 0 = CPU)."""
    workers: int | None = None
    """GPU: image-decoding DataLoader workers per GPU (default 8). CPU: extraction processes (default 1)."""
    batch_size: int = 8
    limit: int | None = None
    max_boxes: int | None = None
    overwrite: bool = False

    def check(self) -> ExtractConfig:
        """Collect every problem with the options and raise them together, naming the flags."""
        problems = []
        if self.storage not in STORAGES:
            problems.append(f"--storage {self.storage!r}: choose one of {', '.join(STORAGES)}")
        for flag, value, low in (
            ("--shard-size", self.shard_size, 1),
            ("--batch-size", self.batch_size, 1),
            ("--limit", self.limit, 1),
            ("--max-boxes", self.max_boxes, 1),
            ("--gpus", self.gpus, 0),
            ("--workers", self.workers, 0),
        ):
            if value is not None and value < low:
                problems.append(f"{flag} {value}: must be at least {low}")
        if self.sam_tokens not in (None, 1, 3):
            problems.append(f"--sam-tokens {self.sam_tokens}: choose 1 or 3")
        if self.proposals is not None and not Path(self.proposals).is_file():
            problems.append(f"--proposals {self.proposals}: no such file")
        if problems:
            raise RegionSpotError("; ".join(problems))
        Location.parse(self.output_dir())  # an unknown protocol or a missing package, before any model
        return self

    def output_dir(self) -> Path | str:
        """The shard set's directory (a Path) or URL (a str)."""
        if self.out is not None:
            return path_or_url(self.out)
        name = self.dataset.split(":")[0] if ":" in self.dataset else self.dataset
        if self.proposals is not None:
            name = f"{name}-{Path(self.proposals).stem}"
        return Path(os.environ.get("REGIONSPOT_SHARDS", "shards")) / name

    def output(self) -> Location:
        """Where the shard set goes, with its storage options."""
        return Location.parse(self.output_dir(), self.storage_options)

    def to_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["storage_options"] = mask_options(self.storage_options or {}) or None  # never a secret
        return out
