"""`PredictConfig`: the options of `regionspot predict`, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from regionspot.devices import DEVICE_HELP, resolve_device
from regionspot.errors import RegionSpotError
from regionspot.models.options import BackboneOptions
from regionspot.options import check_options, option
from regionspot.predict.inputs import parse_boxes, parse_points, parse_vocab, read_vocab_file


@dataclass
class PredictConfig(BackboneOptions):
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
    checkpoint: Path | None = option(
        None, "Checkpoint directory, head.safetensors or official RegionSpot .pth (which takes the "
        "fingerprint of --backbones)."
    )  # fmt: skip
    masks: bool = option(True, "SAM's masks: drawn in the PNG and stored (COCO RLE) in the JSON.")
    attention: bool = option(
        False, "Also write OUT/<stem>.attention.png: each region's attention over the CLIP map."
    )
    embeddings: bool = option(
        False, "Also write OUT/<stem>.embeddings.npy: float32 [N, D] region embeddings."
    )
    topk: int = option(5, "Labels listed per region, best first.", min=1)
    out: Path = option(Path("predictions"), "Output folder: <stem>.json and <stem>.png per image.")
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
        problems += option_problems
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

    def torch_device(self):
        """The torch.device --device names (checked: a CUDA device must be there)."""
        return resolve_device(self.device)

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
