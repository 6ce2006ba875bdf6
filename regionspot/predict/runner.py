"""`regionspot predict` over files: batches of images through the predictor, per-image outputs, a
progress bar and a summary (the options are `config`'s, the inputs `inputs`').

What it writes, per image, as OUT/<name><suffix> (`inputs.OUTPUTS`): <name> is the file stem, or the
relative path without suffix when stems collide across folders, or the file name when they collide in
one folder (img.jpg, img.png). The `.regionspot` in every suffix keeps outputs off the inputs' names.
  <name>.regionspot.json    {"image", "width", "height", "regions": [{"box", "label", "score", "topk",
                            "iou", "mask"?, "point"?, "proposal_score"?}], "dropped_boxes"?,
                            "dropped_points"?}, regions in prompt order;
                            read it with json.load; masks are COCO RLE (pycocotools.mask.decode).
  <name>.regionspot.png     the image with masks, boxes, clicked points and "label score" captions
                            (a small image enlarged by an integer factor, MIN_PICTURE_SIDE).
  <name>.regionspot.attention.png    (--attention) one heat-map panel per region.
  <name>.regionspot.embeddings.npy   (--embeddings) float32 [N, D], prompt order;
                            np.load(..., allow_pickle=False).

Stream: paths (sorted) -> decode thread: a batch of uint8 images -> RegionPredictor.encode_images
(SAM + CLIP once per image) -> predict(features=...) per image -> files. At most two batches of images
are in memory at a time, however many files the inputs name.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from regionspot.data.boxes import best_n_in_order, sanitize_boxes
from regionspot.errors import RegionSpotError
from regionspot.predict.config import PredictConfig
from regionspot.predict.inputs import (
    ImageBoxes,
    box_fault,
    check_outputs,
    expand_inputs,
    output_file,
    output_names,
)

MIN_PICTURE_SIDE = 384  # a smaller image is drawn enlarged, so its captions stay legible


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(path)


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- the run -----------------------------------------------------------------------------------
@dataclass
class Summary:
    images: int = 0
    regions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable images
    boxes_clipped: int = 0
    boxes_dropped: dict[str, int] = field(default_factory=dict)  # why (inputs.box_fault) -> count
    points_dropped: int = 0
    images_without_regions: int = 0
    automatic_advice: str | None = None  # why the automatic regions of an image were none, what to lower
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
        for fault, count in sorted(self.boxes_dropped.items()):
            parts.append(f"{count} box(es) dropped ({fault})")
        if self.points_dropped:
            parts.append(f"{self.points_dropped} point(s) outside their image dropped")
        if self.images_without_regions:
            advice = f" (automatic regions: {self.automatic_advice})" if self.automatic_advice else ""
            parts.append(f"{self.images_without_regions} image(s) without regions{advice}")
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
    names = output_names(paths)
    kinds = ["json", "png"] + ["attention"] * cfg.attention + ["embeddings"] * cfg.embeddings
    check_outputs(paths, names, cfg.out, kinds)
    proposals = None
    if cfg.boxes_file is not None:
        proposals = ImageBoxes.load(cfg.boxes_file, paths)
    return Plan(cfg, paths, names, cfg.vocabulary(), cfg.box_prompts(), cfg.point_prompts(), proposals)


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

    from regionspot.predict.predictor import RegionPredictor
    from regionspot.progress import progress_bar

    plan = make_plan(cfg)
    if predictor is None:
        predictor = RegionPredictor.from_checkpoint(
            cfg.checkpoint, cfg.spec(), device=cfg.torch_device()
        )
    predictor.set_vocabulary(plan.vocabulary)
    predictor.automatic = cfg.automatic_options(predictor.backbones.spec.sam)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    console = Console(stderr=True)
    indexed = list(enumerate(plan.paths))
    progress = progress_bar("predict", "img", show=show_progress)
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
    from regionspot.predict.draw import draw_attention, draw_regions, region_colors, save_png

    cfg, path = plan.cfg, plan.paths[index]
    height, width = features.size
    record = {"image": str(path), "width": width, "height": height, "regions": []}
    proposal_scores = None
    # the same outputs whatever the prompts
    wanted = {"features": features, "topk": cfg.topk, "masks": cfg.masks, "embeddings": cfg.embeddings,
              "attention": cfg.attention}  # fmt: skip
    if plan.points is not None:
        inside = (plan.points[:, 0] <= width) & (plan.points[:, 1] <= height)
        if not inside.all():
            dropped = np.flatnonzero(~inside)
            summary.points_dropped += len(dropped)
            record["dropped_points"] = [{"index": int(i), "point": plan.points[i].tolist()} for i in dropped]
            summary.warn(
                console, f"{path}: {len(dropped)} point(s) outside the {width}x{height} image dropped"
            )
        regions = predictor.predict(points=plan.points[inside], **wanted) if inside.any() else []
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
                faults = [box_fault(given[i], width, height) for i in dropped]
                for fault in faults:
                    summary.boxes_dropped[fault] = summary.boxes_dropped.get(fault, 0) + 1
                record["dropped_boxes"] = [{"index": int(i), "box": given[i].tolist(), "reason": fault}
                                           for i, fault in zip(dropped, faults, strict=True)]  # fmt: skip
                listed = ", ".join(f"#{i + 1} {fault}" for i, fault in zip(dropped[:5], faults, strict=False))
                summary.warn(console, f"{path}: {len(dropped)} box(es) of the {width}x{height} image dropped ({listed})")
            if proposal_scores is not None:
                proposal_scores = proposal_scores[keep]
                best = best_n_in_order(proposal_scores, cfg.max_boxes)
                boxes, proposal_scores = boxes[best], proposal_scores[best]
        regions = predictor.predict(boxes=boxes, **wanted) if boxes is None or len(boxes) else []
    automatic = plan.points is None and plan.boxes is None and plan.proposals is None
    if automatic and not regions and summary.automatic_advice is None:  # once per run: it runs SAM again
        summary.automatic_advice = predictor.explain_no_regions(features)
        summary.warn(console, f"{path}: no automatic regions; {summary.automatic_advice}")
    record["regions"] = [r.to_json() for r in regions]
    if proposal_scores is not None:
        for entry, s in zip(record["regions"], proposal_scores, strict=True):
            entry["proposal_score"] = float(s)
    summary.images += 1
    summary.regions += len(regions)
    summary.images_without_regions += not regions
    name = plan.names[index]
    _write_json(output_file(cfg.out, name, "json"), record)
    labels = [r.label for r in regions]
    colors = region_colors(len(regions))
    boxes_xyxy = np.asarray([r.box for r in regions], np.float32).reshape(-1, 4)
    picture = draw_regions(
        features.image, boxes_xyxy, labels, [r.score for r in regions],
        masks=[r.mask_array() for r in regions] if cfg.masks else None, points=[r.point for r in regions],
        colors=colors, min_side=MIN_PICTURE_SIDE,
    )  # fmt: skip
    save_png(picture, output_file(cfg.out, name, "png"))
    if cfg.attention:
        attention = np.stack([r.attention for r in regions]) if regions else np.zeros((0, 1), np.float32)
        sheet = draw_attention(
            features.image, boxes_xyxy, labels, [r.score for r in regions], attention, colors
        )
        save_png(sheet, output_file(cfg.out, name, "attention"))
    if cfg.embeddings:
        dim = predictor.backbones.clip.embed_dim
        emb = (
            np.stack([r.embedding for r in regions]).astype(np.float32)
            if regions
            else np.zeros((0, dim), np.float32)
        )
        np.save(output_file(cfg.out, name, "embeddings"), emb, allow_pickle=False)
