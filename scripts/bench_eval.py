"""Benchmark the evaluation stage: scoring cached regions (images/s), writing detections.json and the
metric computation (seconds, peak memory) with both evaluators, at LVIS v1 val scale.

Generates synthetic LVIS-format ground truth (19,809 images x --scale, 1,203 classes split 337 rare /
461 common / 405 frequent, ~12.4 boxes per image, negative and not-exhaustive labels) and 300
detections per image (jittered ground-truth boxes, true / negative / random classes, random scores).
Each evaluator runs in its own process, so its peak resident memory is its own.

    python scripts/bench_eval.py --scale 0.1                   # a tenth of LVIS val, both evaluators
    python scripts/bench_eval.py --evaluators fast              # full scale, fast evaluator only
    python scripts/bench_eval.py --skip-metrics --device cuda   # scoring throughput on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LVIS_IMAGES, LVIS_CLASSES = 19809, 1203
FREQ_SPLIT = (("r", 337), ("c", 461), ("f", 405))
W, H = 640, 480


def synth_ground_truth(num_images: int, seed: int = 0, boxes_per_image: float = 12.4) -> dict:
    """LVIS-format ground truth with LVIS's class count, frequency split and box density."""
    rng = np.random.default_rng(seed)
    freqs = [f for f, n in FREQ_SPLIT for _ in range(n)]
    cats = [
        {"id": k + 1, "name": f"class_{k}", "synonyms": [f"class_{k}"], "frequency": f}
        for k, f in enumerate(freqs)
    ]
    # Frequent classes get most boxes, rare ones few, as in LVIS.
    weight = np.array([{"r": 1.0, "c": 8.0, "f": 60.0}[f] for f in freqs])
    weight /= weight.sum()
    images, anns = [], []
    counts = rng.poisson(boxes_per_image, size=num_images)
    for i, n in enumerate(counts):
        image_id = i + 1
        labels = rng.choice(LVIS_CLASSES, size=n, p=weight) + 1
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=n))
        w, h = side, np.minimum(side * rng.uniform(0.5, 1.5, size=n), H - 1)
        w = np.minimum(w, W - 1)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        for j in range(n):
            bbox = [float(x[j]), float(y[j]), float(w[j]), float(h[j])]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(labels[j]),
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                }
            )
        absent = np.setdiff1d(np.arange(1, LVIS_CLASSES + 1), labels)
        neg = rng.choice(absent, size=6, replace=False)
        nel = labels[:1] if n and rng.random() < 0.2 else []
        images.append(
            {
                "id": image_id,
                "width": W,
                "height": H,
                "file_name": f"{image_id:012d}.jpg",
                "neg_category_ids": [int(c) for c in neg],
                "not_exhaustive_category_ids": [int(c) for c in nel],
            }
        )
    return {"images": images, "annotations": anns, "categories": cats}


def synth_detections(gt: dict, per_image: int = 300, seed: int = 1) -> dict[str, np.ndarray]:
    """Columns image_id [M], category_id [M], bbox [M, 4] xywh, score [M]: jittered ground-truth boxes
    labelled with the true class (30 %), a negative class (10 %) or any class (60 %)."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cols = {"image_id": [], "category_id": [], "bbox": [], "score": []}
    for img in gt["images"]:
        anns = by_image.get(img["id"], [])
        if anns:
            boxes = np.array([a["bbox"] for a in anns])[rng.integers(0, len(anns), per_image)]
            true = np.array([a["category_id"] for a in anns])[rng.integers(0, len(anns), per_image)]
        else:
            boxes = np.column_stack(
                [rng.uniform(0, W / 2, (per_image, 2)), rng.uniform(10, W / 2, (per_image, 2))]
            )
            true = rng.integers(1, LVIS_CLASSES + 1, per_image)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * boxes[:, 2:].repeat(2, 1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        kind = rng.random(per_image)
        neg = rng.choice(img["neg_category_ids"], per_image)
        cls = np.where(
            kind < 0.3, true, np.where(kind < 0.4, neg, rng.integers(1, LVIS_CLASSES + 1, per_image))
        )
        cols["image_id"].append(np.full(per_image, img["id"]))
        cols["category_id"].append(cls)
        cols["bbox"].append(boxes)
        cols["score"].append(rng.random(per_image))
    return {k: np.concatenate(v) for k, v in cols.items()}


def to_results(cols: dict[str, np.ndarray]) -> list[dict]:
    """Results-format dicts, as `regionspot eval` hands them to the evaluator."""
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            cols["image_id"].tolist(),
            cols["category_id"].tolist(),
            cols["bbox"].tolist(),
            cols["score"].tolist(),
            strict=True,
        )
    ]


def _rss_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process. ru_maxrss would not do: on
    Linux it survives exec, so a child would report the parent's peak at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_metrics(evaluator: str, gt_path: str, det_path: str) -> None:
    """Runs in its own process: load the detections, compute metrics, print one JSON line.

    The reference evaluator takes results-format dicts; the fast one the columns `regionspot eval`
    holds anyway (one dict per detection alone is ~3 GB at LVIS scale)."""
    from regionspot.evaluate.metrics import compute_metrics

    with np.load(det_path, allow_pickle=False) as z:
        cols = {k: z[k] for k in z.files}
    dets = to_results(cols) if evaluator == "lvis" else cols
    before = _rss_mib()
    t0 = time.perf_counter()
    metrics = compute_metrics(gt_path, dets, evaluator=evaluator)
    seconds = time.perf_counter() - t0
    print(json.dumps({"evaluator": evaluator, "seconds": seconds, "peak_rss_mib": _rss_mib(),
                      "rss_before_mib": before, "AP": metrics["AP"], "APr": metrics["APr"]}))  # fmt: skip


def bench_write(cols: dict[str, np.ndarray], path: Path) -> float:
    """Seconds to write detections.json from columns, as `regionspot eval` does."""
    from regionspot.evaluate.detections import Detections

    dets = Detections(list(range(1, LVIS_CLASSES + 1)))
    starts = np.flatnonzero(np.r_[True, cols["image_id"][1:] != cols["image_id"][:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(cols["image_id"])], strict=True):
        xyxy = cols["bbox"][lo:hi].copy()
        xyxy[:, 2:] += xyxy[:, :2]
        dets.add(int(cols["image_id"][lo]), xyxy, cols["category_id"][lo:hi] - 1, cols["score"][lo:hi])
    t0 = time.perf_counter()
    dets.write_json(path)
    seconds = time.perf_counter() - t0
    print(f"detections.json: {len(dets)} detections, {path.stat().st_size / 2**20:.0f} MiB written in {seconds:.1f} s",
          flush=True)  # fmt: skip
    return seconds


def bench_metrics(scale: float, evaluators: list[str], seed: int) -> dict:
    num_images = max(1, round(LVIS_IMAGES * scale))
    t0 = time.perf_counter()
    gt = synth_ground_truth(num_images, seed)
    dets = synth_detections(gt, seed=seed + 1)
    print(
        f"synthetic LVIS: {num_images} images, {len(gt['annotations'])} boxes, {len(dets['score'])} detections "
        f"({time.perf_counter() - t0:.1f} s to generate)",
        flush=True,
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, det_path = Path(tmp) / "gt.json", Path(tmp) / "dets.npz"
        gt_path.write_text(json.dumps(gt))
        np.savez(det_path, **dets)
        write_seconds = bench_write(dets, Path(tmp) / "detections.json")
        del gt, dets
        for evaluator in evaluators:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", evaluator, str(gt_path), str(det_path)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(f"{evaluator}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(row)
            print(
                f"metrics [{evaluator:4s}] {row['seconds']:8.1f} s   peak RSS {row['peak_rss_mib']:8.0f} MiB "
                f"(detections loaded: {row['rss_before_mib']:.0f} MiB)   AP {row['AP']:.4f}",
                flush=True,
            )
    if len(out) == 2:
        print(f"AP difference between evaluators: {abs(out[0]['AP'] - out[1]['AP']):.2e}")
    return {"write_seconds": write_seconds, "evaluators": out}


def bench_scoring(
    device: str, regions: int, batch: int, images: int, head_width: int, embed_dim: int
) -> dict:
    """Head forward (when the head exists) + softmax + official selection, per image, from cached-like inputs."""
    import torch

    from regionspot.models.scoring import region_probabilities, select_detections

    dev = torch.device(device)
    text = torch.nn.functional.normalize(torch.randn(LVIS_CLASSES, embed_dim, device=dev), dim=-1)
    try:
        from regionspot.models.head import RegionSpotHead

        head = RegionSpotHead(head_width, embed_dim).to(dev).eval()
    except ImportError:
        head = None
        print("scoring: regionspot.models.head not found; timing scoring without the head")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sam = torch.randn(batch, regions, 1, 256, device=dev, dtype=dtype)
    clip = torch.randn(batch, 257, head_width, device=dev, dtype=dtype)
    iou = torch.rand(batch, regions, 1, device=dev)
    scores = torch.ones(regions, device=dev)

    def one_batch():
        with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
            if head is not None:
                logits = head(sam, clip, text)  # [B, N, T, K]
            else:
                logits = 100 * torch.randn(batch, regions, 1, LVIS_CLASSES, device=dev)
            for b in range(batch):
                probs = region_probabilities(logits[b], iou[b])  # [N, K]
                r, c, s = select_detections(probs, scores)
                r.cpu(), c.cpu(), s.cpu()

    one_batch()  # warm-up
    steps = max(1, images // batch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_batch()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    what = "head + scoring" if head is not None else "scoring only"
    print(
        f"scoring [{device}, {what}, {regions} regions/image, {LVIS_CLASSES} classes]: {rate:.1f} images/s "
        f"({LVIS_IMAGES / rate:.0f} s for LVIS val)",
        flush=True,
    )
    return {"device": device, "what": what, "regions": regions, "images_per_s": rate}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_metrics(*sys.argv[2:5])
        return
    import torch  # not in the metric children: their memory is the evaluator's

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of LVIS val's 19,809 images")
    p.add_argument("--evaluators", default="lvis,fast", help="comma-separated: lvis, fast")
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument("--skip-scoring", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--regions", type=int, default=13, help="regions per image (LVIS val GT: ~12.4; proposals: 300)"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="images timed for scoring")
    p.add_argument("--width", type=int, default=1024, help="CLIP width C (ViT-L: 1024)")
    p.add_argument("--embed-dim", type=int, default=768, help="CLIP embedding D (ViT-L: 768)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    report = {"scale": args.scale}
    if not args.skip_scoring:
        report["scoring"] = bench_scoring(
            args.device, args.regions, args.batch, args.images, args.width, args.embed_dim
        )
    if not args.skip_metrics:
        report["metrics"] = bench_metrics(args.scale, args.evaluators.split(","), args.seed)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
