"""What `predict` is given, checked before any model loads: class names, prompts (parsed from the
command line or passed as arrays), the image files and where their outputs go, and --boxes-file
matched to the images by file stem. One set of validators serves the CLI and the Python API."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regionspot.data.boxes import sanitize_boxes
from regionspot.errors import RegionSpotError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


# --- vocabularies and prompts ------------------------------------------------------------------------
def check_vocabulary(names: Sequence[str], source: str = "the vocabulary") -> list[str]:
    """Class names, stripped; an empty vocabulary, a blank name or a name given twice is an error.

    Args:
        names: the class names, in vocabulary order.
        source: how a message names where they came from (--vocab, --vocab-file F, the vocabulary).
    """
    if isinstance(names, str):
        raise RegionSpotError(f"{source} {names!r} is one string; pass a list of names, e.g. ['cat', 'dog']")
    names = [str(n).strip() for n in names]
    if not any(names):
        raise RegionSpotError(f'{source} is empty; give at least one class name, e.g. --vocab "cat,dog,sofa"')
    if "" in names:
        raise RegionSpotError(
            f'{source}: name #{names.index("") + 1} is blank; write "a,b,c" without empty entries'
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegionSpotError(
            f"{source}: {', '.join(map(repr, duplicates))} given more than once; name each class once"
        )
    return names


def parse_vocab(text: str, source: str = "--vocab") -> list[str]:
    """Class names from "a,b,c", checked as `check_vocabulary` does."""
    return check_vocabulary(text.split(","), source)


def read_vocab_file(path: Path) -> list[str]:
    """Class names from a file, one per line (blank lines and lines starting with # ignored)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    names = [n.strip() for n in lines if n.strip() and not n.strip().startswith("#")]
    if not names:
        raise RegionSpotError(f"--vocab-file {path} holds no class names; write one per line")
    return check_vocabulary(names, f"--vocab-file {path}")


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


def check_image(image) -> np.ndarray:
    """The image as uint8 [H, W, 3] RGB; anything else is an error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise RegionSpotError(
            f"image of shape {tuple(image.shape)} and dtype {image.dtype}: expected uint8 HxWx3 RGB "
            "(regionspot.data.images.load_image reads files that way)"
        )
    return image


def _as_rows(values, width: int, what: str) -> np.ndarray:
    """float32 [N, width] from an array-like; one row may be given flat; anything else is an error."""
    array = np.asarray(values, np.float32)
    if array.size == 0:
        return np.zeros((0, width), np.float32)
    if array.ndim == 1 and array.shape[0] == width:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != width:
        raise RegionSpotError(f"{what} of shape {tuple(array.shape)}: expected [N, {width}]")
    return array


def box_fault(box, width: int, height: int) -> str:
    """Why a box was dropped (`sanitize_boxes` did not keep it): "not finite", "empty" (x0 >= x1 or
    y0 >= y1 as given) or "outside the image" (a real box that does not overlap the image)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not np.isfinite([x0, y0, x1, y1]).all():
        return "not finite"
    if x1 <= x0 or y1 <= y0:
        return "empty"
    return "outside the image"


def check_boxes(boxes, width: int, height: int) -> np.ndarray:
    """Boxes as float32 [N, 4] XYXY pixels clipped to the image; a non-finite or empty box, or one
    outside the image, is an error."""
    array = _as_rows(boxes, 4, "boxes (XYXY pixels)")
    clipped, keep, _ = sanitize_boxes(array, width, height)
    if not keep.all():
        i = int(np.flatnonzero(~keep)[0])
        fault = box_fault(array[i], width, height)
        raise RegionSpotError(
            f"box #{i} {array[i].tolist()} is {fault} (the image is {width}x{height}; {int((~keep).sum())} "
            "unusable box(es) in all); give x0 < x1, y0 < y1 overlapping the image"
        )
    return clipped


def check_points(points, width: int, height: int) -> np.ndarray:
    """Points as float32 [N, 2] (x, y) pixels; a point outside the image is an error."""
    array = _as_rows(points, 2, "points ((x, y) pixels)")
    bad = ~np.isfinite(array).all(1) | (array[:, 0] < 0) | (array[:, 0] > width)
    bad |= (array[:, 1] < 0) | (array[:, 1] > height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RegionSpotError(
            f"point #{i} {array[i].tolist()} lies outside the {width}x{height} image; give (x, y) pixels inside it"
        )
    return array


# --- inputs and outputs ------------------------------------------------------------------------
OUTPUT_TAG = ".regionspot"  # in every output's name: an output can never be an input's name
OUTPUTS = {  # what predict writes per image: OUT/<name><suffix>
    "json": OUTPUT_TAG + ".json",
    "png": OUTPUT_TAG + ".png",
    "attention": OUTPUT_TAG + ".attention.png",
    "embeddings": OUTPUT_TAG + ".embeddings.npy",
}


def is_output(path: Path) -> bool:
    """Whether `path` is named like one of predict's outputs (folders and globs skip them: a second run
    into the input folder does not take the first run's pictures for images)."""
    return OUTPUT_TAG + "." in Path(path).name


def expand_inputs(items: list[str]) -> list[Path]:
    """Image paths named by files, directories (recursively, image suffixes only) and globs; sorted
    within each item, duplicates dropped. Folders and globs skip predict's own outputs (`is_output`).
    An item that names nothing is an error."""
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
        if found and not path.is_file():
            found = [p for p in found if not is_output(p)] or None
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
    whose stems collide) the path relative to the images' common folder, then the full file name
    (`img.jpg` and `img.png` in one folder: `img.jpg`, `img.png`)."""
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


def output_file(out: Path, name: Path, kind: str) -> Path:
    """OUT/<name>.regionspot.json (kind "json"), .regionspot.png ("png"), ... (see OUTPUTS)."""
    name = Path(name)
    return Path(out) / name.with_name(name.name + OUTPUTS[kind])


def check_outputs(paths: list[Path], names: list[Path], out: Path, kinds: Sequence[str]) -> None:
    """Refuse a run whose outputs would replace one of its input images (named explicitly)."""
    inputs = {p.resolve(): p for p in paths}
    for name in names:
        for kind in kinds:
            target = output_file(out, name, kind)
            if target.resolve() in inputs:
                raise RegionSpotError(
                    f"{target}: this output would replace the input image {inputs[target.resolve()]}; "
                    "pass another --out, or do not give predict's own outputs (*.regionspot.*) as inputs"
                )


def _common_parent(paths: list[Path]) -> str:
    return os.path.commonpath([str(p.parent) for p in paths])


@dataclass(frozen=True)
class ImageName:
    """A name a --boxes-file may give image `index` of the inputs (what `load_proposals` matches)."""

    key: str
    index: int


class GivenImages:
    """The input images as the dataset a --boxes-file refers to, for `data.proposals.load_proposals`
    (which asks a dataset for its name and the keys of its records). An image answers to its file stem
    and, when the stem is a number, to that number unpadded (`000000000139.jpg` is image 139)."""

    name = "the given images (image_id = file stem)"

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def records(self) -> list[ImageName]:
        names = []
        for index, path in enumerate(self.paths):
            stem = path.stem
            names.append(ImageName(stem, index))
            if stem.isdigit() and str(int(stem)) != stem:
                names.append(ImageName(str(int(stem)), index))
        return names


class ImageBoxes:
    """--boxes-file: each given image's boxes and proposal scores (file order), matched by file stem."""

    def __init__(self, per_image: list[tuple[np.ndarray, np.ndarray]]):
        self.per_image = per_image

    @classmethod
    def load(cls, path: Path, paths: list[Path]) -> ImageBoxes:
        """Read either proposals format (see `data.proposals`); an id matching no given image is an error."""
        from regionspot.data.proposals import load_proposals

        images = GivenImages(paths)
        by_key = load_proposals(path, images).by_key  # validates format and ids, naming offenders
        found: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in paths]
        for name in images.records():
            if name.key in by_key:
                found[name.index].append(by_key[name.key])
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        per_image = []
        for parts in found:
            if len(parts) > 1:  # "139" and "000139" both given for one image: both are its boxes
                parts = [tuple(np.concatenate(columns) for columns in zip(*parts, strict=True))]
            per_image.append(parts[0] if parts else empty)
        return cls(per_image)

    def for_image(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 [N, 4] XYXY pixels, scores float32 [N]) of image `index` as given."""
        return self.per_image[index]
