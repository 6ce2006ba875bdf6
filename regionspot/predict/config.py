"""`PredictConfig`: the options of `regionspot predict`, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError
from regionspot.predict.inputs import parse_boxes, parse_points, parse_vocab, read_vocab_file


@dataclass
class PredictConfig:
    images: list[str] = field(default_factory=list)
    """Image files, directories (searched recursively) or glob patterns."""
    vocab: str | None = None
    """Class names, comma-separated: "cat,dog,sofa"."""
    vocab_file: Path | None = None
    """A file with one class name per line (blank lines and lines starting with # ignored)."""
    boxes: str | None = None
    """The same boxes for every image: "x0,y0,x1,y1;x0,y0,x1,y1" (pixels)."""
    boxes_file: Path | None = None
    """Boxes per image: a COCO results list or the official RegionSpot dict (as `regionspot eval
    --proposals`); an image_id names the image whose file stem is that id."""
    points: str | None = None
    """The same clicks for every image: "x,y;x,y" (pixels); one region per click."""
    checkpoint: Path | None = None
    """A checkpoint directory, a head.safetensors or an official RegionSpot .pth."""
    backbones: str = "bl"
    """Backbone preset the checkpoint was trained with: bb, bl, bl336 or tiny."""
    sam: str | None = None
    sam_checkpoint: str | None = None
    clip: str | None = None
    clip_pretrained: str | None = None
    clip_size: int | None = None
    sam_tokens: int | None = None
    masks: bool = True
    """Compute SAM's masks: drawn in the PNG and stored (COCO RLE) in the JSON."""
    attention: bool = False
    embeddings: bool = False
    topk: int = 5
    out: Path = Path("predictions")
    batch_size: int = 4
    max_boxes: int | None = None
    """--boxes-file: keep the N highest-scoring boxes of each image."""
    device: str | None = None

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
        for flag, value in (
            ("--topk", self.topk),
            ("--batch-size", self.batch_size),
            ("--max-boxes", self.max_boxes),
        ):
            if value is not None and value < 1:
                problems.append(f"{flag} {value}: must be at least 1")
        for parse in (
            self.vocabulary,
            self.box_prompts,
            self.point_prompts,
            self.torch_device,
            self.backbone_spec,
        ):
            try:
                parse()
            except RegionSpotError as e:
                problems.append(str(e))
        if problems:
            raise RegionSpotError("; ".join(problems))
        return self

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

    def backbone_spec(self):
        """The resolved `models.presets.BackboneSpec` (validated; nothing loaded)."""
        from regionspot.models.presets import resolve_backbones

        return resolve_backbones(
            self.backbones, sam=self.sam, sam_checkpoint=self.sam_checkpoint, clip=self.clip,
            clip_pretrained=self.clip_pretrained, clip_size=self.clip_size, sam_tokens=self.sam_tokens,
        )  # fmt: skip

    def torch_device(self):
        import torch

        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise RegionSpotError(
                f"--device {self.device!r}: not a device; use cpu, cuda or cuda:N"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RegionSpotError(f"--device {self.device}: no CUDA device here; use --device cpu")
        return device

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
