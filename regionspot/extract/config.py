"""`ExtractConfig`: everything one extraction run needs, checked before any model is loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from regionspot.data.images import SizeMismatch
from regionspot.data.options import DatasetOptions
from regionspot.errors import RegionSpotError
from regionspot.models.options import BackboneOptions
from regionspot.options import check_options, option, storage_options_option
from regionspot.shards.location import Location, mask_options, path_or_url
from regionspot.shards.storage import STORAGES

Storage = Literal[STORAGES]  # the choices as a type, from their one home
# --gpus: extract's, and eval's for the shard set it extracts on the spot
EXTRACT_GPUS = "processes, one per GPU of this machine (default: all visible; 0: the CPU)"


@dataclass
class ExtractConfig(BackboneOptions, DatasetOptions):
    dataset: str = option(
        "toy",
        "Dataset name (o365, v3det, openimages, lvis_val, coco, toy, toy_val), coco:ANN.json:IMAGES or "
        "openimages:BOXES.csv:CLASSES.csv:IMAGES.",
    )
    out: Path | str | None = option(
        None, "Shard set directory or URL (s3://bucket/prefix, gs://..., file://...); default "
        "$REGIONSPOT_SHARDS/DATASET, else shards/DATASET; with proposals shards/DATASET-PROPOSALS."
    )  # fmt: skip
    storage_options: dict | None = storage_options_option("--out URL's")
    masks: bool = option(False, "Also store SAM's mask per region (COCO RLE).")
    storage: Storage = option("wds", "Shard storage: wds (tar files) or zarr.")
    shard_size: int = option(1000, "Images per shard: the unit of resume and distribution.", min=1)
    proposals: Path | None = option(
        None, "A detector's boxes instead of the annotations ('gt'): a COCO results JSON or the official "
        "RegionSpot dict."
    )  # fmt: skip
    gpus: int | None = option(None, f"Extraction {EXTRACT_GPUS}.", min=0)
    workers: int | None = option(
        None, "With GPUs: image-decoding processes per GPU (default 8). On the CPU (--gpus 0): extraction "
        "processes (default 1).", min=0,
    )  # fmt: skip
    batch_size: int | None = option(
        None, "Images per forward pass (default: 32 on a GPU, 8 on the CPU).", min=1
    )
    size_mismatch: SizeMismatch = option(
        "skip", "An image whose decoded size is not its annotation's width x height: skip (listed in the "
        "manifest) or rescale (resized to the annotated size, so the boxes keep their place)."
    )  # fmt: skip
    limit: int | None = option(None, "Extract only the first N images (by key).", min=1)
    max_boxes: int | None = option(
        None, "Keep an image's N best regions: proposals by score, annotations by size.", min=1
    )
    overwrite: bool = option(False, "Replace the shards of a different run in --out.")

    def check(self) -> ExtractConfig:
        """Collect every problem with the options and raise them together, naming the flags."""
        problems = check_options(self)
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
