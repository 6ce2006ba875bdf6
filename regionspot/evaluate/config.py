"""`EvalConfig`: everything one evaluation run needs, checked before any model or shard is loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location, mask_options, path_or_url

METHODS = ("regionspot", "clip-crop", "clip-mask")
EVALUATORS = ("lvis", "fast")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalConfig:
    checkpoint: Path | None = None
    """A checkpoint directory (runs/NAME/checkpoints/step-N or .../last), a head.safetensors, or an
    official RegionSpot .pth. Not used by the clip-crop / clip-mask baselines."""
    proposals: str = "gt"
    """'gt' (the annotated boxes, score 1) or a detector's boxes: a COCO results JSON or the official dict."""
    dataset: str = "lvis_val"
    """Dataset name or coco:ANNOTATIONS.json:IMAGES; its COCO/LVIS annotations are the ground truth."""
    data_root: Path | None = None
    """Root of the named datasets (else $REGIONSPOT_DATASETS, else datasets/)."""
    shards: Path | str | None = None
    """The shard set to read (a directory or a URL). Default: one under --shards-root made for this
    dataset, proposals and backbones, else one extracted now (and kept there for the next checkpoint)."""
    shards_root: Path | str | None = None
    """Where shard sets are looked for and made: a directory or a URL (else $REGIONSPOT_SHARDS, else
    shards/)."""
    storage_options: dict | None = None
    """Options of the --shards / --shards-root URL's fsspec filesystem (endpoint_url, profile, ...)."""
    backbones: str = "bl"
    """Backbone preset (bb, bl, bl336, tiny), for an official .pth, the baselines and extraction."""
    sam: str | None = None
    sam_checkpoint: str | None = None
    clip: str | None = None
    clip_pretrained: str | None = None
    clip_size: int | None = None
    sam_tokens: int | None = None
    method: str = "regionspot"
    """regionspot (the head), clip-crop (CLIP on each box crop) or clip-mask (crop with the outside of
    SAM's mask painted CLIP's mean colour)."""
    max_dets: int = 300
    """Detections kept per image, by score (LVIS: 300)."""
    candidates: int = 900
    """(region, class) pairs kept per image by probability before scoring (official: 900)."""
    masks: bool = False
    """Also write SAM's masks as segmentations and report segm metrics (shards extracted with --masks)."""
    evaluator: str = "lvis"
    """lvis: the reference APIs (lvis package / pycocotools); fast: the vectorised evaluator."""
    out: Path | None = None
    """Output folder for detections.json, metrics.json and config.yaml."""
    batch_size: int = 16
    """Images per head forward pass."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    workers: int = 0
    """Shard-reading worker processes."""
    gpus: int | None = None
    """For extraction on the spot: processes, one per GPU (default: all visible; 0 = CPU)."""
    limit: int | None = None
    """Evaluate the first N images only (by key); the ground truth is cut to them."""

    def check(self) -> EvalConfig:
        """Collect every problem with the options and raise them together, naming the flags."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.evaluator not in EVALUATORS:
            problems.append(f"--evaluator {self.evaluator!r}: choose one of {', '.join(EVALUATORS)}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            problems.append(f"--device {self.device!r}: choose one of {', '.join(DEVICES)} or cuda:N")
        for flag, value, low in (
            ("--max-dets", self.max_dets, 1),
            ("--candidates", self.candidates, 1),
            ("--batch-size", self.batch_size, 1),
            ("--workers", self.workers, 0),
            ("--gpus", self.gpus, 0),
            ("--limit", self.limit, 1),
        ):
            if value is not None and value < low:
                problems.append(f"{flag} {value}: must be at least {low}")
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

    def backbone_overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("sam", "sam_checkpoint", "clip", "clip_pretrained", "clip_size",
                                              "sam_tokens")}  # fmt: skip

    def to_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["storage_options"] = mask_options(self.storage_options or {}) or None  # never a secret
        return out
