"""Named datasets and dataset specs -> a `Reader`.

The named datasets live under the data root (`--data-root`, else `$REGIONSPOT_DATASETS`, else
`datasets/`) in the layout detectron2 and the official code use (DESIGN.md §3); anything else is
named by a spec: `coco:ANNOTATIONS.json:IMAGE_DIR` or `openimages:BOXES.csv:CLASSES.csv:IMAGE_DIR`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from regionspot.data.coco import CocoReader
from regionspot.data.openimages import OpenImagesReader
from regionspot.data.records import Reader
from regionspot.data.toy import ensure_toy
from regionspot.errors import RegionSpotError

ENV_DATA_ROOT = "REGIONSPOT_DATASETS"
DEFAULT_DATA_ROOT = "datasets"
SPECS = "coco:ANNOTATIONS.json:IMAGE_DIR, openimages:BOXES.csv:CLASSES.csv:IMAGE_DIR"


@dataclass(frozen=True)
class NamedDataset:
    """Where a named dataset's files are, relative to the data root, and where to get them."""

    annotations: tuple[str, ...]  # candidates, first found wins (Objects365 v1, then v2)
    images: str
    url: str
    classes: str | None = None  # OpenImages class descriptions
    format: str = "coco"


DATASETS: dict[str, NamedDataset] = {
    "o365": NamedDataset(
        ("objects365/objects365_train.json", "objects365/zhiyuan_objv2_train.json"),
        "objects365/train",
        "https://www.objects365.org (Objects365 v1 train; v2's zhiyuan_objv2_train.json also reads)",
    ),
    "v3det": NamedDataset(
        ("v3det/v3det_2023_v1_train.json",), "v3det/V3Det", "https://v3det.openxlab.org.cn"
    ),
    "openimages": NamedDataset(
        ("openimages/oidv6-train-annotations-bbox.csv",),
        "openimages/train",
        "https://storage.googleapis.com/openimages/web/download_v6.html",
        classes="openimages/class-descriptions-boxable.csv",
        format="openimages",
    ),
    "lvis_val": NamedDataset(
        ("lvis/lvis_v1_val.json",),
        "coco",
        "https://www.lvisdataset.org/dataset (LVIS v1 val; images: COCO 2017 train + val from https://cocodataset.org)",
    ),
    "coco": NamedDataset(
        ("coco/annotations/instances_val2017.json",),
        "coco/val2017",
        "https://cocodataset.org/#download (2017 Val images, 2017 Train/Val annotations)",
    ),
    "toy": NamedDataset((), "toy", "generated on first use", format="toy"),
    "toy_val": NamedDataset((), "toy", "generated on first use", format="toy"),
}


def list_datasets() -> list[str]:
    """The named datasets, sorted."""
    return sorted(DATASETS)


def resolve_data_root(explicit: Path | str | None = None) -> Path:
    """The data root: `explicit` (--data-root), else $REGIONSPOT_DATASETS, else `datasets`."""
    if explicit is not None:
        return Path(explicit).expanduser()
    return Path(os.environ.get(ENV_DATA_ROOT) or DEFAULT_DATA_ROOT).expanduser()


def _missing(path: Path, what: str, hint: str) -> RegionSpotError:
    return RegionSpotError(f"missing {path} ({what}); {hint}")


def _require(path: Path, what: str, hint: str, directory: bool = False) -> Path:
    if not (path.is_dir() if directory else path.is_file()):
        raise _missing(path, what, hint)
    return path


def _open_named(name: str, entry: NamedDataset, root: Path, check_images: bool, outside: bool) -> Reader:
    if entry.format == "toy":
        annotations, image_dir = ensure_toy(root, "val" if name == "toy_val" else "train")
        return CocoReader(annotations, image_dir, name, data_root=root, allow_outside_root=outside)
    hint = (
        f"get it from {entry.url} and put it there, or point --data-root / ${ENV_DATA_ROOT} "
        f"at the folder that holds {entry.annotations[0].split('/')[0]}/"
    )
    found = [root / a for a in entry.annotations if (root / a).is_file()]
    if not found:
        also = (
            f" or {', '.join(str(root / a) for a in entry.annotations[1:])}"
            if len(entry.annotations) > 1
            else ""
        )
        raise _missing(root / entry.annotations[0], f"annotations of {name!r}{also}", hint)
    image_dir = root / entry.images
    if check_images:
        _require(image_dir, f"images of {name!r}", hint, directory=True)
    if entry.format == "openimages":
        classes = _require(root / entry.classes, f"class descriptions of {name!r}", hint)
        return OpenImagesReader(
            found[0], classes, image_dir, name, data_root=root, allow_outside_root=outside
        )
    return CocoReader(found[0], image_dir, name, data_root=root, allow_outside_root=outside)


def _open_spec(spec: str, root: Path, check_images: bool, outside: bool) -> Reader:
    kind = spec.split(":", 1)[0]
    parts = spec.split(":", 2 if kind == "coco" else 3)
    if len(parts) != (3 if kind == "coco" else 4) or not all(parts):
        raise RegionSpotError(f"dataset spec {spec!r} is incomplete; write {SPECS}")
    hint = f"check the paths in --dataset {spec}"
    roles = ("annotations",) if kind == "coco" else ("boxes CSV", "class descriptions")
    files = [
        _require(Path(p), f"{role} of {spec!r}", hint) for p, role in zip(parts[1:-1], roles, strict=True)
    ]
    image_dir = Path(parts[-1])
    if check_images:
        _require(image_dir, f"image folder of {spec!r}", hint, directory=True)
    if kind == "coco":
        return CocoReader(files[0], image_dir, spec, data_root=root, allow_outside_root=outside)
    return OpenImagesReader(files[0], files[1], image_dir, spec, data_root=root, allow_outside_root=outside)


def open_dataset(
    spec: str,
    data_root: Path | str | None = None,
    check_images: bool = True,
    allow_outside_root: bool = False,
) -> Reader:
    """A reader for a named dataset or a spec; its files are checked now, parsed on first use.

    Args:
        spec: a name from `list_datasets()`, `coco:ANN.json:IMAGE_DIR` or
            `openimages:BOXES.csv:CLASSES.csv:IMAGE_DIR` (spec paths are taken as given).
        data_root: see `resolve_data_root`.
        check_images: also require the image folder (off for annotation-only uses, e.g. evaluation).
        allow_outside_root: read image file names that leave the image folder (`../x.jpg`, `/x.jpg`);
            by default such images are skipped by extraction, counted and listed (see `Reader`).
    Raises:
        RegionSpotError: unknown name, malformed spec, or a missing file (naming the expected path).
    """
    root = resolve_data_root(data_root)
    if spec in DATASETS:
        return _open_named(spec, DATASETS[spec], root, check_images, allow_outside_root)
    if spec.split(":", 1)[0] in ("coco", "openimages") and ":" in spec:
        return _open_spec(spec, root, check_images, allow_outside_root)
    raise RegionSpotError(f"unknown dataset {spec!r}; available: {', '.join(list_datasets())} (or {SPECS})")
