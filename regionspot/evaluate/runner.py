"""`run_eval`: one evaluation — checks, features, scoring in the official order, results file, metrics.

The stream: shard set (cached SAM tokens + CLIP maps, manifest order) -> padded batches -> the head
(or CLIP on crops, for the baselines) -> per image: softmax over the vocabulary, `candidates` pairs by
probability, score = proposal score x probability, `max_dets` by score -> `Detections` columns ->
detections.json + metrics.json + config.yaml in the output folder, and a printed table.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from regionspot.devices import resolve_device
from regionspot.errors import RegionSpotError
from regionspot.evaluate.config import EvalConfig
from regionspot.evaluate.detections import Detections
from regionspot.evaluate.features import resolve_shardset, wanted
from regionspot.evaluate.metrics import compute_metrics, load_ground_truth, metric_names
from regionspot.models.scoring import region_probabilities, select_detections
from regionspot.progress import progress_bar
from regionspot.shards.location import Location


@dataclass
class EvalResult:
    """What an evaluation produced. metrics: {"bbox": {name: value|None}, "segm": {...} with --masks}."""

    out: Path
    metrics: dict[str, dict[str, float | None]]
    shards: Path | Location  # the shard set's directory, or the Location of its URL
    shards_source: str  # "given", "found" or "extracted"
    images: int
    detections: int
    info: dict = field(default_factory=dict)


def run_eval(cfg: EvalConfig, show: bool = True) -> EvalResult:
    """Evaluate a checkpoint (or a CLIP baseline) on a dataset's GT boxes or a detector's proposals.

    Every option, the dataset's annotations and the proposals file are checked before any model or
    shard is loaded. Returns the metrics and where the outputs went; `show` prints the table.
    """
    from regionspot.data.datasets import open_dataset
    from regionspot.data.proposals import load_proposals
    from regionspot.shards.shardset import ShardSet

    cfg.check()
    spec = cfg.spec()
    reader = open_dataset(
        cfg.dataset, cfg.data_root, check_images=cfg.method != "regionspot", allow_outside_root=cfg.allow_outside_root
    )
    gt_path = ground_truth_path(reader)
    proposals = load_proposals(cfg.proposals_path, reader) if cfg.proposals_path is not None else None
    out = cfg.output_dir()
    device = resolve_device(cfg.device)

    head, backbones, info = None, None, {}
    if cfg.method == "regionspot":
        head, fingerprint, info["checkpoint"] = _load_head(cfg, spec)
    else:
        from regionspot.models.presets import load_backbones

        backbones = load_backbones(spec, device=device, **cfg.runtime())
        fingerprint = backbones.fingerprint
    want = wanted(cfg, reader, proposals, fingerprint)
    shard_dir, how = resolve_shardset(cfg, want, reader)
    shardset = ShardSet(shard_dir)
    shardset.check_fingerprint(fingerprint, against="the checkpoint" if head is not None else "--backbones")
    if cfg.needs_masks and not shardset.manifest.get("run", {}).get("masks"):
        raise RegionSpotError(
            f"{shard_dir} was extracted without --masks; {cfg.method} / --masks need SAM masks"
        )

    dets = Detections([int(v["id"]) for v in shardset.vocabulary], with_masks=cfg.masks)
    text = torch.as_tensor(shardset.text_embeddings(), dtype=torch.float32).to(device)  # [K, D]
    if head is not None:
        seen = _score_with_head(cfg, shardset, head, text, dets, device)
    else:
        seen = _score_with_clip(cfg, shardset, reader, backbones, text, dets, device)

    out.mkdir(parents=True, exist_ok=True)
    props = (
        "gt"
        if proposals is None
        else {"path": cfg.proposals, "sha256": proposals.sha256, "stats": proposals.stats}
    )
    resolved = {
        "config": cfg.to_json(),
        "shards": {"path": str(shard_dir), "source": how, "fingerprint": shardset.fingerprint},
        "ground_truth": str(gt_path),
        "proposals": props,
        **info,
    }
    _write_yaml(out / "config.yaml", resolved)
    dets.write_json(out / "detections.json")

    gt = restrict_ground_truth(load_ground_truth(gt_path), seen, shardset, reader, cfg.limit)
    cols = dets.columns()
    metrics = {"bbox": compute_metrics(gt, cols, "bbox", cfg.evaluator, cfg.max_dets)}
    if cfg.masks:
        metrics["segm"] = compute_metrics(gt, cols, "segm", cfg.evaluator, cfg.max_dets)
    summary = {
        **metrics,
        "info": {"dataset": reader.name, "method": cfg.method, "proposals": cfg.proposals, "evaluator": cfg.evaluator,
                 "images": len(gt["images"]), "images_scored": dets.images, "detections": len(dets),
                 "shards": str(shard_dir), "max_dets": cfg.max_dets, "candidates": cfg.candidates},
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    result = EvalResult(out, metrics, shard_dir, how, dets.images, len(dets), summary["info"])
    if show:
        print_table(result)
    return result


def ground_truth_path(reader) -> Path:
    """The reader's COCO / LVIS annotation file (evaluation needs one)."""
    path = getattr(reader, "annotations", None)
    if path is None or Path(path).suffix.lower() != ".json":
        raise RegionSpotError(f"dataset {reader.name!r} has no COCO/LVIS annotation file to evaluate against; "
                              "evaluate on lvis_val, coco, toy_val or coco:ANNOTATIONS.json:IMAGES")  # fmt: skip
    return Path(path)


def restrict_ground_truth(gt: dict, seen: set, shardset, reader, limit: int | None) -> dict:
    """The annotations to score against: all images, unless the evaluation covers only part of the
    dataset (--limit, or a shard set extracted with a limit): then the images scored plus the ones
    extraction skipped (which count as images without detections)."""
    partial = limit is not None or shardset.manifest.get("run", {}).get("limit") is not None
    if not partial:
        return gt
    ids = set(seen)
    for s in (shardset.manifest.get("dataset") or {}).get("skipped") or []:
        try:
            ids.add(reader.record_by_image_id(s["key"]).image_id)
        except KeyError:
            pass
    return {**gt, "images": [i for i in gt["images"] if i["id"] in ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}  # fmt: skip


def _load_head(cfg: EvalConfig, spec):
    """The head, the backbones fingerprint it answers to, and what to record about it."""
    from regionspot.models.checkpoint import head_fingerprint, load_head, resolve_checkpoint
    from regionspot.models.presets import load_backbones

    file = resolve_checkpoint(cfg.checkpoint)
    head, fingerprint, imported = load_head(file)
    fingerprint = head_fingerprint(fingerprint, lambda: load_backbones(spec, device="cpu").fingerprint)
    info = {"path": str(file), "fingerprint": fingerprint, "imported": bool(imported), "head": head.config()}
    return head, fingerprint, info


def _select(cfg: EvalConfig, probs: torch.Tensor, sample, dets: Detections) -> None:
    """The official selection for one image, appended to `dets`."""
    scores = torch.as_tensor(np.asarray(sample.scores, np.float32), device=probs.device)
    region, cls, score = select_detections(probs, scores, cfg.candidates, cfg.max_dets)
    region = region.cpu().numpy()
    masks = None
    if cfg.masks:
        if sample.masks is None:
            raise RegionSpotError("--masks needs shards extracted with --masks")
        masks = [sample.masks[j] for j in region]
    dets.add(sample.image_id, np.asarray(sample.boxes)[region], cls.cpu().numpy(), score.cpu().numpy(), masks)


def _score_with_head(cfg, shardset, head, text, dets, device) -> set:
    from regionspot.shards.loader import iter_batches

    head = head.to(device).eval()
    seen: set = set()
    with _progress(
        shardset.num_images if cfg.limit is None else min(cfg.limit, shardset.num_images)
    ) as advance:
        # With workers, shards arrive interleaved; --limit means the first N images, so read in order.
        workers = 0 if cfg.limit is not None else cfg.workers
        for batch, samples in iter_batches(shardset, cfg.batch_size, num_workers=workers):
            if cfg.limit is not None and len(seen) >= cfg.limit:
                break
            b = batch.to(device, dtype=torch.float32)
            logits = None
            if b.sam_tokens.shape[1] > 0:  # a batch of images without regions has nothing to score
                with torch.inference_mode():
                    logits = head(b.sam_tokens, b.clip_map, text, region_mask=b.region_mask)  # [B, N, (T,) K]
            for i, sample in enumerate(samples):
                if cfg.limit is not None and len(seen) >= cfg.limit:
                    break
                seen.add(sample.image_id)
                n = sample.num_regions
                if n == 0:
                    dets.add(sample.image_id, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))
                    continue
                probs = region_probabilities(logits[i, :n], b.sam_iou[i, :n])  # [n, K]
                _select(cfg, probs, sample, dets)
            advance(len(samples))
    return seen


def _score_with_clip(cfg, shardset, reader, backbones, text, dets, device) -> set:
    from regionspot.data.images import load_image
    from regionspot.evaluate.baselines import clip_region_logits

    seen: set = set()
    scale = float(shardset.logit_scale)
    total = shardset.num_images if cfg.limit is None else min(cfg.limit, shardset.num_images)
    with _progress(total) as advance:
        for sample in shardset.iter_samples():
            if cfg.limit is not None and len(seen) >= cfg.limit:
                break
            seen.add(sample.image_id)
            if sample.num_regions == 0:
                dets.add(sample.image_id, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))
                advance(1)
                continue
            image = load_image(reader.record_by_image_id(sample.image_id).path)
            masks = sample.masks if cfg.method == "clip-mask" else None
            if cfg.method == "clip-mask" and masks is None:
                raise RegionSpotError("--method clip-mask needs shards extracted with --masks")
            logits = clip_region_logits(
                backbones.clip, image, sample.boxes, text, scale, masks, device
            )  # [n, K]
            _select(cfg, torch.softmax(logits.float(), dim=-1), sample, dets)
            advance(1)
    return seen


@contextmanager
def _progress(total: int):
    """A bar over the images scored (transient); yields advance(n)."""
    with progress_bar("scoring", "img", transient=True) as bar:
        task = bar.add_task("scoring", total=total)
        yield lambda n: bar.advance(task, n)


def _write_yaml(path: Path, obj: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False))


def print_table(result: EvalResult) -> None:
    """The metrics as a table (x 100, as papers report them); '-' where a group has no ground truth."""
    from rich.console import Console
    from rich.table import Table

    info = result.info
    table = Table(title=f"{info['method']} on {info['dataset']} ({info['proposals']} boxes, {info['images']} images, "
                  f"{info['evaluator']} evaluator)")  # fmt: skip
    table.add_column("metric")
    kinds = list(result.metrics)
    for kind in kinds:
        table.add_column(kind, justify="right")
    names = list(result.metrics["bbox"]) or metric_names("lvis", info["max_dets"])
    for name in names:
        cells = [result.metrics[k].get(name) for k in kinds]
        table.add_row(name, *("-" if v is None else f"{100 * v:.1f}" for v in cells))
    Console().print(table)
    Console().print(f"outputs: {result.out}  (shards: {result.shards}, {result.shards_source})")
