"""`regionspot predict` over files: options, inputs, per-image outputs, batches and a progress bar.

What it writes, per image (OUT/<stem>, or OUT/<relative path without suffix> when stems collide):
  <stem>.json             {"image", "width", "height", "regions": [{"box", "label", "score", "topk",
                          "iou", "mask"?, "point"?, "proposal_score"?}], "dropped_boxes"?} in prompt order;
                          read it with json.load; masks are COCO RLE (pycocotools.mask.decode).
  <stem>.png              the image with masks, boxes and "label score" captions.
  <stem>.attention.png    (--attention) one heat-map panel per region.
  <stem>.embeddings.npy   (--embeddings) float32 [N, D], prompt order; np.load(..., allow_pickle=False).

Stream: paths (sorted) -> decode thread: a batch of uint8 images -> RegionPredictor.encode_images
(SAM + CLIP once per image) -> predict_features per image -> files. At most two batches of images
are in memory at a time, however many files the inputs name.
"""

from __future__ import annotations

import glob
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
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
    import os

    return os.path.commonpath([str(p.parent) for p in paths])


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(path)


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def num_batches(n: int, size: int) -> int:
    return math.ceil(n / size)


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


# --- the run -----------------------------------------------------------------------------------
@dataclass
class Summary:
    images: int = 0
    regions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable images
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    points_dropped: int = 0
    images_without_regions: int = 0
    warnings: int = 0

    def warn(self, console, message: str, limit: int = 20) -> None:
        """Print a per-image problem; after `limit` of them only count (the summary line has totals)."""
        self.warnings += 1
        if self.warnings <= limit:
            from rich.markup import escape

            console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
        elif self.warnings == limit + 1:
            console.print("[yellow]warning:[/] further problems are only counted in the summary")

    def line(self) -> str:
        parts = [f"{self.images} image(s), {self.regions} region(s) named"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable image(s) skipped")
        if self.boxes_clipped:
            parts.append(f"{self.boxes_clipped} box(es) clipped to their image")
        if self.boxes_dropped:
            parts.append(f"{self.boxes_dropped} empty box(es) dropped")
        if self.points_dropped:
            parts.append(f"{self.points_dropped} point(s) outside their image dropped")
        if self.images_without_regions:
            parts.append(f"{self.images_without_regions} image(s) without regions")
        return "; ".join(parts)


@dataclass
class Plan:
    """Everything `run_predict` needs, checked and parsed; no model loaded yet."""

    cfg: PredictConfig
    paths: list[Path]
    names: list[Path]  # output names relative to cfg.out, no suffix
    vocabulary: list[str]
    boxes: np.ndarray | None  # [N, 4], the same for every image
    points: np.ndarray | None  # [N, 2], the same for every image
    proposals: object | None  # ImageBoxes for --boxes-file


def make_plan(cfg: PredictConfig) -> Plan:
    """Check every option, find the images, read and match --boxes-file; loads no model."""
    cfg.check()
    paths = expand_inputs(cfg.images)
    proposals = None
    if cfg.boxes_file is not None:
        proposals = ImageBoxes.load(cfg.boxes_file, paths)
    return Plan(
        cfg, paths, output_names(paths), cfg.vocabulary(), cfg.box_prompts(), cfg.point_prompts(), proposals
    )


def _decode(paths: list[Path]) -> list[tuple[np.ndarray | None, str | None]]:
    from regionspot.data.images import ImageDecodeError, load_image

    out = []
    for path in paths:
        try:
            out.append((load_image(path), None))
        except ImageDecodeError as e:
            out.append((None, str(e)))
        except (OSError, ValueError) as e:  # anything else a broken file throws is still that file's fault
            out.append((None, f"cannot read {path}: {e}"))
    return out


def run_predict(cfg: PredictConfig, predictor=None, show_progress: bool = True) -> Summary:
    """Name the regions of every image the options name and write the outputs under cfg.out."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from regionspot.predict import RegionPredictor

    plan = make_plan(cfg)
    if predictor is None:
        predictor = RegionPredictor.from_checkpoint(
            cfg.checkpoint, cfg.backbone_spec(), device=cfg.torch_device()
        )
    predictor.set_vocabulary(plan.vocabulary)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    console = Console(stderr=True)
    indexed = list(enumerate(plan.paths))
    progress = Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not show_progress,
    )  # fmt: skip
    with progress, ThreadPoolExecutor(max_workers=1) as pool:
        task = progress.add_task("predict", total=len(indexed))
        chunks = list(batches(indexed, cfg.batch_size))
        pending = pool.submit(_decode, [p for _, p in chunks[0]]) if chunks else None
        for b, chunk in enumerate(chunks):
            decoded = pending.result()
            # decode the next batch while this one runs through the models
            pending = pool.submit(_decode, [p for _, p in chunks[b + 1]]) if b + 1 < len(chunks) else None
            good = []
            for (index, path), (image, error) in zip(chunk, decoded, strict=True):
                if error is None:
                    good.append((index, image))
                else:
                    summary.skipped.append((str(path), error))
                    summary.warn(progress.console, f"skipped {path}: {error}")
            features = predictor.encode_images([image for _, image in good])
            for (index, _), feats in zip(good, features, strict=True):
                _predict_one(plan, predictor, index, feats, summary, progress.console)
            progress.update(task, advance=len(chunk))
    if summary.images == 0:
        raise RegionSpotError(f"none of the {len(plan.paths)} image(s) could be read; see the messages above")
    console.print(f"{summary.line()}; outputs in {cfg.out}", markup=False, highlight=False, soft_wrap=True)
    return summary


def _predict_one(plan: Plan, predictor, index: int, features, summary: Summary, console) -> None:
    from regionspot.data.boxes import sanitize_boxes
    from regionspot.draw import draw_attention, draw_regions, label_colors, save_png

    cfg, path = plan.cfg, plan.paths[index]
    height, width = features.size
    record = {"image": str(path), "width": width, "height": height, "regions": []}
    proposal_scores = None
    if plan.points is not None:
        inside = (plan.points[:, 0] <= width) & (plan.points[:, 1] <= height)
        if not inside.all():
            dropped = np.flatnonzero(~inside)
            summary.points_dropped += len(dropped)
            record["dropped_points"] = [{"index": int(i), "point": plan.points[i].tolist()} for i in dropped]
            summary.warn(
                console, f"{path}: {len(dropped)} point(s) outside the {width}x{height} image dropped"
            )
        regions = predictor.predict_features(
            features, points=plan.points[inside], topk=cfg.topk, masks=cfg.masks,
            embeddings=cfg.embeddings, attention=cfg.attention,
        ) if inside.any() else []  # fmt: skip
    else:
        boxes = None
        if plan.boxes is not None or plan.proposals is not None:
            given, proposal_scores = (
                (plan.boxes, None) if plan.boxes is not None else plan.proposals.for_image(index)
            )
            clipped, keep, counts = sanitize_boxes(given, width, height)  # (N, 4), (N,)
            boxes = clipped[keep]
            summary.boxes_clipped += int(counts.get("clipped", 0))
            if not keep.all():
                dropped = np.flatnonzero(~keep)
                summary.boxes_dropped += len(dropped)
                record["dropped_boxes"] = [{"index": int(i), "box": given[i].tolist()} for i in dropped]
                summary.warn(
                    console,
                    f"{path}: {len(dropped)} empty box(es) dropped (#{', #'.join(str(i + 1) for i in dropped[:5])})",
                )
            if proposal_scores is not None:
                proposal_scores = proposal_scores[keep]
                best = keep_best(proposal_scores, cfg.max_boxes)
                boxes, proposal_scores = boxes[best], proposal_scores[best]
        regions = predictor.predict_features(
            features, boxes=boxes if boxes is not None else None, topk=cfg.topk, masks=cfg.masks,
            embeddings=cfg.embeddings, attention=cfg.attention,
        ) if boxes is None or len(boxes) else []  # fmt: skip
    record["regions"] = [r.to_json() for r in regions]
    if proposal_scores is not None:
        for entry, s in zip(record["regions"], proposal_scores, strict=True):
            entry["proposal_score"] = float(s)
    summary.images += 1
    summary.regions += len(regions)
    summary.images_without_regions += not regions
    stem = cfg.out / plan.names[index]
    _write_json(stem.with_name(stem.name + ".json"), record)
    labels = [r.label for r in regions]
    colors = label_colors(labels)
    boxes_xyxy = np.asarray([r.box for r in regions], np.float32).reshape(-1, 4)
    picture = draw_regions(
        features.image, boxes_xyxy, labels, [r.score for r in regions],
        masks=[r.mask_array() for r in regions] if cfg.masks else None, colors=colors,
    )  # fmt: skip
    save_png(picture, stem.with_name(stem.name + ".png"))
    if cfg.attention:
        attention = np.stack([r.attention for r in regions]) if regions else np.zeros((0, 1), np.float32)
        sheet = draw_attention(
            features.image, boxes_xyxy, labels, [r.score for r in regions], attention, colors
        )
        save_png(sheet, stem.with_name(stem.name + ".attention.png"))
    if cfg.embeddings:
        dim = predictor.backbones.clip.embed_dim
        emb = (
            np.stack([r.embedding for r in regions]).astype(np.float32)
            if regions
            else np.zeros((0, dim), np.float32)
        )
        np.save(stem.with_name(stem.name + ".embeddings.npy"), emb, allow_pickle=False)
