"""`EvalConfig`: everything one evaluation run needs, checked before any model or shard is loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from regionspot.data.options import DatasetOptions
from regionspot.devices import DEVICE_HELP, check_device_name
from regionspot.errors import RegionSpotError
from regionspot.evaluate.metrics import EVALUATORS
from regionspot.extract.config import EXTRACT_GPUS
from regionspot.models.options import BackboneOptions, checkpoint_option
from regionspot.options import check_options, option, storage_options_option
from regionspot.shards.location import Location, mask_options, path_or_url

Method = Literal["regionspot", "clip-crop", "clip-mask"]
Evaluator = Literal[EVALUATORS]  # the choices as a type, from their one home


@dataclass
class EvalConfig(BackboneOptions, DatasetOptions):
    checkpoint: Path | None = checkpoint_option(" Not used by the clip-crop / clip-mask baselines.")
    proposals: str = option(
        "gt", "'gt' (the annotated boxes, score 1) or a detector's boxes: a COCO results JSON or the official dict."
    )
    dataset: str = option(
        "lvis_val", "Dataset name (lvis_val, coco, toy_val, ...) or coco:ANN.json:IMAGES; its COCO/LVIS "
        "annotations are the ground truth."
    )  # fmt: skip
    shards: Path | str | None = option(
        None, "Shard set to read, a directory or a URL (default: one under --shards-root made for this dataset, proposals and "
        "backbones, else one extracted there now and kept for the next checkpoint)."
    )  # fmt: skip
    shards_root: Path | str | None = option(
        None, "Where shard sets are found and made, a directory or a URL (default: $REGIONSPOT_SHARDS, else "
        "shards/)."
    )  # fmt: skip
    storage_options: dict | None = storage_options_option("--shards / --shards-root URL's")
    method: Method = option(
        "regionspot", "regionspot (the head), clip-crop (CLIP on each box crop) or clip-mask (the crop with the "
        "outside of SAM's mask painted CLIP's mean colour): the paper's CLIP baselines."
    )  # fmt: skip
    max_dets: int = option(300, "Detections kept per image, by score (LVIS: 300).", min=1)
    candidates: int = option(
        900, "(region, class) pairs kept per image by probability before scoring (official: 900).", min=1
    )
    masks: bool = option(
        False, "Also write SAM's masks as segmentations and report segm metrics (needs shards with masks)."
    )
    evaluator: Evaluator = option(
        "lvis", "lvis: the reference APIs (lvis package / pycocotools); fast: the vectorised evaluator "
        "(same numbers)."
    )  # fmt: skip
    out: Path | None = option(
        None, "Output folder for detections.json, metrics.json and config.yaml (default: "
        "runs/NAME/eval/STEP-DATASET-PROPOSALS beside the checkpoint)."
    )  # fmt: skip
    batch_size: int = option(16, "Images per head forward pass.", min=1)
    device: str = option("auto", DEVICE_HELP)
    workers: int = option(0, "Processes that read shards (0: read in the main process).", min=0)
    gpus: int | None = option(None, f"Extraction on the spot: {EXTRACT_GPUS}.", min=0)
    limit: int | None = option(
        None, "Evaluate the first N images only (by key); the ground truth is cut to them.", min=1
    )

    def check(self) -> EvalConfig:
        """Collect every problem with the options and raise them together, naming the flags."""
        problems = check_options(self)
        try:
            check_device_name(self.device)
        except RegionSpotError as e:
            problems.append(str(e))
        if self.method == "regionspot":
            if self.checkpoint is None:
                problems.append("--checkpoint is required for --method regionspot (a checkpoint dir, "
                                "head.safetensors or official .pth)")  # fmt: skip
            elif not Path(self.checkpoint).exists():
                problems.append(f"--checkpoint {self.checkpoint}: no such file or directory")
        if self.proposals != "gt" and not Path(self.proposals).is_file():
            problems.append(f"--proposals {self.proposals}: no such file (use 'gt' for the annotated boxes)")
        if self.shards is not None and self.shards_location().is_local and not Path(self.shards).is_dir():
            problems.append(f"--shards {self.shards}: no such directory")
        if problems:
            raise RegionSpotError("; ".join(problems))
        self.shards_root_dir()  # an unknown protocol or a missing package, before any model
        return self

    @property
    def proposals_path(self) -> Path | None:
        return None if self.proposals == "gt" else Path(self.proposals)

    @property
    def needs_masks(self) -> bool:
        """Shards with SAM masks are needed: segm results, or the clip-mask baseline."""
        return self.masks or self.method == "clip-mask"

    def shards_location(self) -> Location | None:
        """--shards with its storage options (None when not given)."""
        return None if self.shards is None else Location.parse(path_or_url(self.shards), self.storage_options)

    def shards_root_dir(self) -> Location:
        """--shards-root (else $REGIONSPOT_SHARDS, else shards/) with its storage options."""
        root = self.shards_root or os.environ.get("REGIONSPOT_SHARDS") or "shards"
        return Location.parse(path_or_url(root), self.storage_options)

    def output_dir(self) -> Path:
        """--out, else beside the checkpoint's run (runs/NAME/eval/STEP-DATASET-PROPOSALS), else eval/..."""
        if self.out is not None:
            return Path(self.out)
        dataset = self.dataset.split(":")[0] if ":" in self.dataset else self.dataset
        what = f"{dataset}-{'gt' if self.proposals == 'gt' else Path(self.proposals).stem}"
        if self.method != "regionspot":
            return Path("eval") / f"{self.method}-{what}"
        ckpt = Path(self.checkpoint).resolve()
        if ckpt.is_file() and ckpt.name == "head.safetensors":
            ckpt = ckpt.parent
        if ckpt.is_dir() and (ckpt / "checkpoints" / "last").is_file():  # a run directory
            ckpt = ckpt / "checkpoints" / "last"
        if ckpt.name == "last" and ckpt.is_file():  # a text file naming the newest step directory
            ckpt = ckpt.parent / ckpt.read_text().strip()
        if ckpt.parent.name == "checkpoints":  # runs/NAME/checkpoints/step-N
            return ckpt.parent.parent / "eval" / f"{ckpt.name}-{what}"
        return Path("eval") / f"{ckpt.stem}-{what}"

    def to_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["storage_options"] = mask_options(self.storage_options or {}) or None  # never a secret
        return out
