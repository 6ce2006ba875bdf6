"""The procedural toy dataset: coloured shapes on grey textured backgrounds, in LVIS v1 format.

Written on first use under `<data_root>/toy/`:
  annotations/toy_train.json, annotations/toy_val.json   LVIS v1 format (read by `CocoReader`)
  images/train/000000000001.png ...                     PNG (train)
  images/val/000001000001.jpg ...                       JPEG (val)

A region's class is its colour (ten saturated, well separated colours; the shape — rectangle,
ellipse, triangle or diamond — is drawn at random and says nothing about the class), so the class
is decidable from where the region is (the SAM token) plus what colour the image is there (the CLIP
map): learnable by a head on randomly initialised tiny backbones. Images are 160 x 128 px with 2-5
shapes of different classes, 32-64 px each, overlapping little, so a shape covers several 8-px
patches of a 64-px CLIP view. Train class frequencies follow the LVIS definition of each class's
`frequency` (r: 1-10 training images, c: 11-100, f: more); val draws classes uniformly, so rare
classes are evaluated too. Every image lists all classes it does not show in `neg_category_ids`.
Generation is deterministic (a fixed seed per split) and atomic (a temporary folder, then renames;
the annotation file, renamed last, marks a complete split).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from regionspot.errors import RegionSpotError

TOY_VERSION = 1
WIDTH, HEIGHT = 160, 128
SPLITS = {  # split -> (default images, seed, first image id, image format)
    "train": (600, 20231102, 1, "png"),
    "val": (150, 20231103, 1_000_001, "jpg"),
}
# name, synonyms, RGB, LVIS frequency, share of train images showing it (None: fills the rest)
CLASSES = (
    ("red", ("red", "scarlet"), (220, 30, 30), "f", None),
    ("green", ("green", "emerald"), (30, 175, 45), "f", None),
    ("blue", ("blue", "azure"), (35, 65, 225), "f", None),
    ("yellow", ("yellow", "lemon"), (240, 220, 30), "f", None),
    ("magenta", ("magenta", "fuchsia"), (215, 40, 205), "c", 0.05),
    ("cyan", ("cyan", "aqua"), (35, 205, 215), "c", 0.075),
    ("orange", ("orange", "amber"), (250, 135, 15), "c", 0.11),
    ("purple", ("purple", "violet"), (105, 35, 165), "c", 0.15),
    ("white", ("white", "snow"), (248, 248, 248), "r", 0.01),
    ("black", ("black", "ebony"), (18, 18, 18), "r", 0.015),
)
SHAPES = ("rectangle", "ellipse", "triangle", "diamond")
MIN_SIDE, MAX_SIDE, MAX_OVERLAP = 32, 64, 0.1


def ensure_toy(
    data_root: Path | str, split: str = "train", num_images: int | None = None
) -> tuple[Path, Path]:
    """Generate the toy split under `<data_root>/toy/` unless it is already there.

    Args:
        data_root: the data root (see `datasets.resolve_data_root`).
        split: "train" (dataset `toy`) or "val" (dataset `toy_val`).
        num_images: images to generate (default 600 train / 150 val). None accepts whatever size
            is already there; a different explicit size regenerates the split.
    Returns:
        (annotation JSON path, image folder): what `CocoReader` takes.
    """
    split = {"toy": "train", "toy_val": "val"}.get(split, split)
    if split not in SPLITS:
        raise RegionSpotError(f"unknown toy split {split!r}; choose train or val")
    root = Path(data_root) / "toy"
    annotations, image_dir = root / "annotations" / f"toy_{split}.json", root / "images" / split
    if _complete(annotations, image_dir, num_images):
        return annotations, image_dir
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{split}.lock"):
        if _complete(annotations, image_dir, num_images):  # another process finished it meanwhile
            return annotations, image_dir
        for stale in root.glob(f".tmp-{split}-*"):  # left by a killed generation
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=root))
        try:
            dataset = generate(split, tmp / "images", num_images)
            (tmp / "annotations.json").write_text(json.dumps(dataset, separators=(",", ":"), allow_nan=False))
            annotations.unlink(missing_ok=True)  # the completion mark goes first, comes back last
            if image_dir.exists():
                shutil.rmtree(image_dir)
            image_dir.parent.mkdir(exist_ok=True)
            annotations.parent.mkdir(exist_ok=True)
            os.replace(tmp / "images", image_dir)
            os.replace(tmp / "annotations.json", annotations)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return annotations, image_dir


def generate(split: str, image_dir: Path, num_images: int | None = None) -> dict:
    """Draw a split's images into `image_dir` and return its LVIS-format annotation dict."""
    default_n, seed, first_id, ext = SPLITS[split]
    n = default_n if num_images is None else int(num_images)
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    plan = _train_classes(rng, n) if split == "train" else _uniform_classes(rng, n)
    category_ids = list(range(1, len(CLASSES) + 1))
    images, annotations = [], []
    for i, classes in enumerate(plan):
        image_id = first_id + i
        file_name = f"{image_id:012d}.{ext}"
        pixels, shapes = _draw(rng, classes)
        _save(pixels, image_dir / file_name, ext)
        present = sorted({c + 1 for c, *_ in shapes})
        images.append(
            {
                "id": image_id,
                "width": WIDTH,
                "height": HEIGHT,
                "file_name": file_name,
                "coco_url": f"http://toy.regionspot.invalid/{split}/{file_name}",
                "license": 1,
                "flickr_url": "",
                "date_captured": "",
                "neg_category_ids": [c for c in category_ids if c not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        for c, bbox, area, polygon in shapes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c + 1,
                    "bbox": bbox,
                    "area": area,
                    "segmentation": [polygon],
                }
            )
    counts = _counts(annotations)
    categories = [
        {
            "id": k + 1,
            "name": name,
            "synonyms": list(synonyms),
            "def": f"a {name} shape",
            "synset": f"{name}.n.01",
            "frequency": frequency,
            "image_count": counts[k + 1][0],
            "instance_count": counts[k + 1][1],
        }
        for k, (name, synonyms, _, frequency, _) in enumerate(CLASSES)
    ]
    return {
        "info": {
            "description": "regionspot toy dataset: coloured shapes, class = colour",
            "version": TOY_VERSION,
            "split": split,
            "num_images": n,
            "seed": seed,
            "image_size": [WIDTH, HEIGHT],
        },
        "licenses": [{"id": 1, "name": "generated by regionspot", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _train_classes(rng: np.random.Generator, n: int) -> list[list[int]]:
    """Per image, its classes (rarer first): r/c classes on a fixed share of the images, f classes fill up."""
    scheduled = [[] for _ in range(n)]
    for k, (*_, share) in enumerate(CLASSES):
        if share is not None:
            for i in rng.choice(n, min(n, max(1, round(share * n))), replace=False):
                scheduled[i].append(k)
    frequent = np.array([k for k, c in enumerate(CLASSES) if c[4] is None])
    plan = []
    for classes in scheduled:
        want = int(rng.integers(2, 6))
        fill = rng.choice(frequent, min(len(frequent), max(0, want - len(classes))), replace=False)
        plan.append(classes + [int(k) for k in fill])
    return plan


def _uniform_classes(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [
        [int(k) for k in rng.choice(len(CLASSES), int(rng.integers(2, 6)), replace=False)] for _ in range(n)
    ]


def _draw(rng: np.random.Generator, classes: list[int]):
    """One image: uint8 [H, W, 3] and its shapes [(class, bbox XYWH, area, polygon [x0, y0, x1, ...])]."""
    low = rng.normal(0.0, 1.0, (HEIGHT // 16 + 2, WIDTH // 16 + 2)).astype(np.float32)
    texture = np.asarray(Image.fromarray(low, mode="F").resize((WIDTH, HEIGHT), Image.BILINEAR))
    grey = rng.uniform(105, 150) + 8.0 * texture  # (H, W) low-contrast mottled grey
    canvas = np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3) float
    placed, shapes = [], []
    for c in classes:
        box = _place(rng, placed)
        if box is None:
            continue  # no room left: the image shows fewer shapes
        placed.append(box)
        polygon = _polygon(SHAPES[int(rng.integers(len(SHAPES)))], *box)
        mask_image = Image.new("L", (WIDTH, HEIGHT), 0)
        ImageDraw.Draw(mask_image).polygon(polygon, fill=1)
        mask = np.asarray(mask_image, bool)
        colour = np.clip(np.array(CLASSES[c][2]) + rng.integers(-12, 13, 3), 0, 255)
        canvas[mask] = colour
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
        flat = [round(v, 1) for point in polygon for v in point]
        shapes.append((c, bbox, float(mask.sum()), flat))
    canvas += rng.normal(0.0, 3.0, canvas.shape)  # fine grain on everything
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), shapes


def _place(rng: np.random.Generator, placed: list[tuple[int, int, int, int]]):
    """A box (x, y, w, h) that overlaps each placed box by at most MAX_OVERLAP of the smaller one."""
    for attempt in range(60):
        hi = MAX_SIDE if attempt < 30 else (MIN_SIDE + MAX_SIDE) // 2  # crowded: try smaller shapes
        w, h = (int(v) for v in rng.integers(MIN_SIDE, hi + 1, 2))
        x, y = int(rng.integers(0, WIDTH - w + 1)), int(rng.integers(0, HEIGHT - h + 1))
        if all(_overlap((x, y, w, h), b) <= MAX_OVERLAP * min(w * h, b[2] * b[3]) for b in placed):
            return x, y, w, h
    return None


def _overlap(a, b) -> int:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, iw) * max(0, ih)


def _polygon(shape: str, x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    """The shape's outline in pixel coordinates, inside the box's pixels x..x+w-1, y..y+h-1."""
    x1, y1, cx, cy = x + w - 1, y + h - 1, x + (w - 1) / 2, y + (h - 1) / 2
    if shape == "rectangle":
        return [(x, y), (x1, y), (x1, y1), (x, y1)]
    if shape == "triangle":
        return [(x, y1), (cx, y), (x1, y1)]
    if shape == "diamond":
        return [(cx, y), (x1, cy), (cx, y1), (x, cy)]
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    return [(float(cx + (w - 1) / 2 * np.cos(a)), float(cy + (h - 1) / 2 * np.sin(a))) for a in t]


def _save(pixels: np.ndarray, path: Path, ext: str) -> None:
    image = Image.fromarray(pixels, "RGB")
    if ext == "png":
        image.save(path, format="PNG", compress_level=6)
    else:
        image.save(path, format="JPEG", quality=92)


def _counts(annotations: list[dict]) -> dict[int, tuple[int, int]]:
    """category id -> (images showing it, instances)."""
    images, instances = {}, {}
    for a in annotations:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    return {k + 1: (len(images.get(k + 1, ())), instances.get(k + 1, 0)) for k in range(len(CLASSES))}


def _complete(annotations: Path, image_dir: Path, num_images: int | None) -> bool:
    if not (annotations.is_file() and image_dir.is_dir()):
        return False
    try:
        info = json.loads(annotations.read_bytes()).get("info", {})
    except (OSError, ValueError):
        return False
    return info.get("version") == TOY_VERSION and (num_images is None or info.get("num_images") == num_images)


@contextmanager
def _locked(path: Path):
    """An exclusive lock across processes (extraction workers may all ask for the toy set at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the renames still keep a split whole
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
