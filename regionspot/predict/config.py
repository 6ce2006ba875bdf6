"""`PredictConfig`: the options of `regionspot predict`, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from regionspot.devices import DEVICE_HELP, resolve_device
from regionspot.errors import RegionSpotError
from regionspot.models.options import BackboneOptions, Preset, checkpoint_option
from regionspot.options import check_options, option
from regionspot.predict.inputs import parse_boxes, parse_points, parse_vocab, read_vocab_file

DEFAULT_PRESET = "bl"
# SamAutomaticMaskGenerator's own defaults suit SAM's real weights. The random `tiny` SAM rates every
# mask near 0 (predicted IoU and stability), so for it the filters are off and the grid is small.
AUTOMATIC_DEFAULTS = {
    "sam": {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95},
    "tiny": {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}


def automatic_defaults(sam: str) -> dict:
    """SamAutomaticMaskGenerator options for a SAM variant (vit_b, ..., tiny) when none are given."""
    return {**AUTOMATIC_DEFAULTS["tiny" if sam == "tiny" else "sam"], "min_mask_region_area": 0}


@dataclass
class PredictConfig(BackboneOptions):
    backbones: Preset | None = option(
        None,
        "Backbone preset: bb (SAM ViT-B + CLIP ViT-B/16), bl (SAM ViT-B + CLIP ViT-L/14), bl336 (+ CLIP "
        "ViT-L/14 at 336 px) or tiny (small random backbones, no weights); the flags below override parts of it. "
        f"Default: the checkpoint's, when its backbones fingerprint is the tiny preset's; else {DEFAULT_PRESET}.",
    )
    images: list[str] = option(
        default_factory=list, help="Image files, folders (searched recursively) or glob patterns."
    )
    vocab: str | None = option(None, 'Class names, comma-separated: "cat,dog,sofa".')
    vocab_file: Path | None = option(
        None, "A file with one class name per line (blank lines and lines starting with # ignored)."
    )
    boxes: str | None = option(None, 'The same boxes for every image: "x0,y0,x1,y1;x0,y0,x1,y1" (pixels).')
    boxes_file: Path | None = option(
        None, "Boxes per image: a COCO results list or the official RegionSpot dict (as eval --proposals); "
        "an image_id names the image whose file stem is that id."
    )  # fmt: skip
    points: str | None = option(
        None, 'The same clicks for every image: "x,y;x,y" (pixels), one region each. No boxes or points: '
        "SAM's automatic regions."
    )  # fmt: skip
    checkpoint: Path | None = checkpoint_option()
    masks: bool = option(True, "SAM's masks: drawn in the PNG and stored (COCO RLE) in the JSON.")
    attention: bool = option(
        False, "Also write OUT/<stem>.regionspot.attention.png: each region's attention over the CLIP map."
    )
    embeddings: bool = option(
        False, "Also write OUT/<stem>.regionspot.embeddings.npy: float32 [N, D] region embeddings."
    )
    points_per_side: int | None = option(
        None, "Automatic regions (no --boxes or --points): SAM's grid of N x N clicks (default: 32; 8 for tiny).",
        min=1,
    )  # fmt: skip
    pred_iou_thresh: float | None = option(
        None, "Automatic regions: keep the masks SAM rates above this predicted IoU, 0..1 (default: 0.88; "
        "0, off, for tiny: its random SAM rates every mask near 0)."
    )  # fmt: skip
    stability_score_thresh: float | None = option(
        None, "Automatic regions: keep the masks whose stability score is above this, 0..1 (default: 0.95; "
        "0, off, for tiny)."
    )  # fmt: skip
    min_area: int = option(
        0, "Automatic regions: drop those whose box is smaller than N pixels; SAM also removes islands and "
        "holes smaller than N pixels from each mask (its min_mask_region_area).", min=0
    )  # fmt: skip
    topk: int = option(5, "Labels listed per region, best first.", min=1)
    out: Path = option(
        Path("predictions"), "Output folder: <stem>.regionspot.json and <stem>.regionspot.png per image "
        "(never an input's name, so it may be the images' own folder)."
    )  # fmt: skip
    batch_size: int = option(4, "Images per backbone forward pass.", min=1)
    max_boxes: int | None = option(None, "With --boxes-file: keep each image's N highest-scoring boxes.", min=1)
    device: str = option("auto", DEVICE_HELP)

    def check(self) -> PredictConfig:
        """Collect every problem with the options and raise them together, naming the flags."""
        problems = []
        if not self.images:
            problems.append("give at least one IMAGE, DIR or GLOB")
        if (self.vocab is None) == (self.vocab_file is None):
            problems.append('give the class names with --vocab "a,b,c" or --vocab-file FILE (one of them)')
        prompts = [f for f, v in (("--boxes", self.boxes), ("--boxes-file", self.boxes_file), ("--points", self.points))
                   if v is not None]  # fmt: skip
        if len(prompts) > 1:
            problems.append(f"{' and '.join(prompts)}: give at most one of them")
        if self.vocab_file is not None and not Path(self.vocab_file).is_file():
            problems.append(f"--vocab-file {self.vocab_file}: no such file")
        if self.boxes_file is not None and not Path(self.boxes_file).is_file():
            problems.append(f"--boxes-file {self.boxes_file}: no such file")
        if self.checkpoint is None:
            problems.append(
                "--checkpoint: give a checkpoint directory, a head.safetensors or an official .pth"
            )
        elif not Path(self.checkpoint).exists():
            problems.append(f"--checkpoint {self.checkpoint}: no such file or directory")
        option_problems = check_options(self)
        for flag, value in (("--pred-iou-thresh", self.pred_iou_thresh),
                            ("--stability-score-thresh", self.stability_score_thresh)):  # fmt: skip
            if value is not None and not 0 <= value <= 1:
                option_problems.append(f"{flag} {value}: must be in [0, 1]")
        problems += option_problems
        if not problems:  # no --backbones: the checkpoint's preset, if its fingerprint names one
            # (a --backbones the checkpoint contradicts is refused here: its own problems would mislead)
            from regionspot.models.presets import backbones_for_checkpoint  # here: loads torch

            found = backbones_for_checkpoint(self.backbones, self.checkpoint)
            self.backbones = found.get("backbones", self.backbones or DEFAULT_PRESET)
            if self.sam_tokens is None and "sam_tokens" in found:
                self.sam_tokens = found["sam_tokens"]
        parsers = [self.vocabulary, self.box_prompts, self.point_prompts, self.torch_device]
        if not option_problems:  # the backbones' own check would repeat a bad choice; it checks files and tags
            parsers.append(self.spec)
        for parse in parsers:
            try:
                parse()
            except RegionSpotError as e:
                problems.append(str(e))
        if problems:
            raise RegionSpotError("; ".join(problems))
        return self

    def spec(self):
        """`BackboneOptions.spec`, with the default preset while --backbones is unset (`check` sets it)."""
        from regionspot.models.presets import resolve_backbones

        return resolve_backbones(self.backbones or DEFAULT_PRESET, **self.backbone_overrides())

    def vocabulary(self) -> list[str] | None:
        if self.vocab is not None:
            return parse_vocab(self.vocab)
        if self.vocab_file is not None and Path(self.vocab_file).is_file():
            return read_vocab_file(self.vocab_file)
        return None

    def box_prompts(self) -> np.ndarray | None:
        return None if self.boxes is None else parse_boxes(self.boxes)

    def point_prompts(self) -> np.ndarray | None:
        return None if self.points is None else parse_points(self.points)

    def automatic_options(self, sam: str) -> dict:
        """SamAutomaticMaskGenerator options for prompt-less images: the flags given, else the defaults of
        the SAM variant `sam` (see `automatic_defaults`)."""
        given = {"points_per_side": self.points_per_side, "pred_iou_thresh": self.pred_iou_thresh,
                 "stability_score_thresh": self.stability_score_thresh, "min_mask_region_area": self.min_area}
        return {**automatic_defaults(sam), **{k: v for k, v in given.items() if v is not None}}

    def torch_device(self):
        """The torch.device --device names (checked: a CUDA device must be there)."""
        return resolve_device(self.device)

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
