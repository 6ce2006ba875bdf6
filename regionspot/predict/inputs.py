"""`regionspot predict` options, checked before any model loads: the class names, the prompts, the
image files and where their outputs go, and --boxes-file matched to the images by file stem."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from regionspot.errors import RegionSpotError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


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
            return parse_vocab(self.vocab, "--vocab")
        if self.vocab_file is not None and Path(self.vocab_file).is_file():
            lines = Path(self.vocab_file).read_text(encoding="utf-8").splitlines()
            names = [n.strip() for n in lines if n.strip() and not n.strip().startswith("#")]
            if not names:
                raise RegionSpotError(
                    f"--vocab-file {self.vocab_file} holds no class names; write one per line"
                )
            return parse_vocab(names, f"--vocab-file {self.vocab_file}")
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


def parse_vocab(names, flag: str = "--vocab") -> list[str]:
    """Class names from "a,b,c" (or a list): stripped; empty, blank or duplicate names are errors."""
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names]
    if not any(names):
        raise RegionSpotError(f'{flag} is empty; give at least one class name, e.g. --vocab "cat,dog,sofa"')
    if "" in names:
        raise RegionSpotError(
            f'{flag}: name #{names.index("") + 1} is blank; write "a,b,c" without empty entries'
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegionSpotError(
            f"{flag}: {', '.join(map(repr, duplicates))} given more than once; name each class once"
        )
    return names


def _parse_tuples(text: str, flag: str, arity: int, example: str) -> np.ndarray:
    items = [t.strip() for t in text.strip().strip(";").split(";")]
    if not text.strip() or not any(items):
        raise RegionSpotError(f'{flag} is empty; write {flag} "{example}"')
    rows = []
    for i, item in enumerate(items):
        parts = [p.strip() for p in item.split(",")]
        if len(parts) != arity or not all(re.fullmatch(_NUMBER, p) for p in parts):
            raise RegionSpotError(
                f'{flag}: entry #{i + 1} {item!r} is not {arity} comma-separated numbers; write {flag} "{example}"'
            )
        rows.append([float(p) for p in parts])
    return np.asarray(rows, np.float32)


def parse_boxes(text: str) -> np.ndarray:
    """ "x0,y0,x1,y1;..." -> float32 [N, 4] XYXY pixels; malformed or inverted boxes are errors."""
    boxes = _parse_tuples(text, "--boxes", 4, "x0,y0,x1,y1;x0,y0,x1,y1")
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise RegionSpotError(
            f"--boxes: box #{bad[0] + 1} {boxes[bad[0]].tolist()} is empty; boxes are x0,y0,x1,y1 with x0 < x1, y0 < y1"
        )
    return boxes


def parse_points(text: str) -> np.ndarray:
    """ "x,y;..." -> float32 [N, 2] pixels."""
    return _parse_tuples(text, "--points", 2, "x,y;x,y")


# --- inputs and outputs ------------------------------------------------------------------------
def expand_inputs(items: list[str]) -> list[Path]:
    """Image paths named by files, directories (recursively, image suffixes only) and globs; sorted
    within each item, duplicates dropped. An item that names nothing is an error."""
    paths, missing = [], []
    for item in items:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            found = None
        if not found:
            missing.append(item)
        else:
            paths += found
    if missing:
        raise RegionSpotError(
            f"{len(missing)} input(s) name no image: {', '.join(map(repr, missing[:5]))}; "
            "give image files, folders holding images, or glob patterns"
        )
    seen, unique = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_names(paths: list[Path]) -> list[Path]:
    """Where each image's outputs go, relative to OUT, without suffix: the file stem, or (for images
    whose stems collide) the path relative to the images' common folder, then the full file name."""
    stems = [Path(p.stem) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [p.resolve() for p in paths]
    common = Path(_common_parent(resolved))
    relative = [r.relative_to(common).with_suffix("") for r in resolved]
    counts = {s: stems.count(s) for s in stems}
    names = [rel if counts[s] > 1 else s for s, rel in zip(stems, relative, strict=True)]
    if len(set(names)) < len(names):  # a.jpg and a.png in one folder: keep the suffix in the name
        names = [r.relative_to(common) for r in resolved]
    return names


def _common_parent(paths: list[Path]) -> str:
    return os.path.commonpath([str(p.parent) for p in paths])


class _StemReader:
    """The given images as a dataset for `load_proposals`: an image answers to its file stem and,
    when the stem is a number, to that number unpadded (`000000000139.jpg` is image 139)."""

    name = "the given images (image_id = file stem)"

    def __init__(self, paths: list[Path]):
        self.aliases = [_aliases(p.stem) for p in paths]

    def records(self):
        from types import SimpleNamespace

        return [SimpleNamespace(key=k) for keys in self.aliases for k in keys]


def _aliases(stem: str) -> tuple[str, ...]:
    return (stem, str(int(stem))) if stem.isdigit() and str(int(stem)) != stem else (stem,)


class ImageBoxes:
    """--boxes-file: each given image's boxes and proposal scores (file order), matched by file stem."""

    def __init__(self, per_image: list[tuple[np.ndarray, np.ndarray]]):
        self.per_image = per_image

    @classmethod
    def load(cls, path: Path, paths: list[Path]) -> ImageBoxes:
        """Read either proposals format (see `data.proposals`); an id matching no given image is an error."""
        from regionspot.data.proposals import load_proposals

        reader = _StemReader(paths)
        by_key = load_proposals(path, reader).by_key  # validates format and ids, naming offenders
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        per_image = []
        for keys in reader.aliases:
            found = [by_key[k] for k in keys if k in by_key]
            if len(found) > 1:  # "139" and "000139" both given for one image: both are its boxes
                found = [tuple(np.concatenate(parts) for parts in zip(*found, strict=True))]
            per_image.append(found[0] if found else empty)
        return cls(per_image)

    def for_image(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 [N, 4] XYXY pixels, scores float32 [N]) of image `index` as given."""
        return self.per_image[index]


def keep_best(scores: np.ndarray, max_boxes: int | None) -> np.ndarray:
    """Indices of the `max_boxes` highest scores (ties: file order), in file order, as `Proposals.apply`."""
    if max_boxes is None or len(scores) <= max_boxes:
        return np.arange(len(scores))
    return np.sort(np.argsort(-scores, kind="stable")[:max_boxes])
