"""Benchmark `regionspot extract`: images/s, regions/s, the time split and bytes per image.

Generates a synthetic COCO-format dataset (JPEG images of --image-size px on the long side with
--boxes boxes each) and runs the real extraction stage on it. Full-size presets need weights; with
--random-weights the script saves randomly initialised SAM / CLIP weights of the preset's shapes to
temporary files (the speed is the same as with the released weights).

    python scripts/bench_extract.py --backbones tiny --images 64                # CPU smoke run
    python scripts/bench_extract.py --backbones bl --random-weights --images 2000 --boxes 16 \
        --image-size 1024 --batch-size 32 --workers 12                         # one GPU
    python scripts/bench_extract.py --data-path                                 # the workers' CPU cost

--data-path needs no model: it writes JPEGs of 640x480 and 1024x768 px and measures the CPU time one
DataLoader worker spends per image (`ImageFiles.__getitem__`: read the file, parse the JPEG header
and EXIF; the pixels are decoded on the device) against PIL decoding the same files alone. Goal: the
worker costs at most 1.5x the decode alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionspot.data.records import ImageRecord
from regionspot.extract.config import ExtractConfig
from regionspot.extract.decode import ImageFiles
from regionspot.extract.runner import run_extract
from regionspot.shards.shardset import ShardSet


def make_dataset(root: Path, images: int, boxes: int, size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": f"class{i}"} for i in range(20)]}
    h = size * 3 // 4
    base = rng.integers(0, 255, (h // 8, size // 8, 3), dtype=np.uint8)
    for i in range(images):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((size, h), Image.BILINEAR)
        img.save(root / "images" / f"{i:08d}.jpg", quality=90)
        coco["images"].append({"id": i + 1, "file_name": f"{i:08d}.jpg", "width": size, "height": h})
        for _ in range(boxes):
            w, bh = rng.uniform(20, size / 3), rng.uniform(20, h / 3)
            x, y = rng.uniform(0, size - w), rng.uniform(0, h - bh)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                        "category_id": int(rng.integers(1, 21)), "bbox": [x, y, w, bh], "area": w * bh})
    (root / "annotations.json").write_text(json.dumps(coco))
    return f"coco:{root / 'annotations.json'}:{root / 'images'}"


def _cpu_ms_per_call(calls: list[Callable[[], object]], repeats: int) -> float:
    """Median over `repeats` rounds of the process CPU time per call, in ms (a first round warms the page cache)."""
    for call in calls:
        call()
    rounds = []
    for _ in range(repeats):
        start = time.process_time()
        for call in calls:
            call()
        rounds.append((time.process_time() - start) / len(calls) * 1000)
    return float(np.median(rounds))


def data_path(images_per_size: int, repeats: int) -> None:
    """Print a worker's CPU ms per image and PIL's decode alone for the same JPEGs (no model)."""
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for width, height in ((640, 480), (1024, 768)):
            for i in range(images_per_size):
                path = Path(tmp) / f"{width}-{i:04d}.jpg"
                base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
                Image.fromarray(base).resize((width, height), Image.BILINEAR).save(path, quality=90)
                records.append(ImageRecord(key=path.stem, image_id=len(records), file_name=path.name, path=path,
                                           width=width, height=height))
        files = ImageFiles(records)
        assert all(files[i].jpeg is not None for i in range(len(files))), "a JPEG went to the CPU decode"

        def decode(path: Path) -> None:
            with Image.open(path) as im:
                im.convert("RGB")

        worker = _cpu_ms_per_call([lambda i=i: files[i] for i in range(len(files))], repeats)
        alone = _cpu_ms_per_call([lambda p=r.path: decode(p) for r in records], repeats)
    print(f"{len(records)} JPEGs ({images_per_size} each of 640x480 and 1024x768, quality 90), "
          f"median of {repeats} rounds; ratio {worker / alone:.2f} (goal <= 1.5)")
    print(f"worker cpu ms/img: {worker:.3f}")
    print(f"jpeg decode alone ms/img: {alone:.3f}")


def random_weights(preset: str, root: Path) -> dict:
    """Random weights of the preset's shapes, saved as the real files would be."""
    import open_clip
    from segment_anything import sam_model_registry

    if preset == "tiny":
        return {}
    from regionspot.models.presets import PRESETS

    spec = PRESETS[preset]
    sam_path, clip_path = root / "sam.pth", root / "clip.pt"
    torch.save(sam_model_registry[spec.sam]().state_dict(), sam_path)
    torch.save(open_clip.create_model(spec.clip, pretrained=None).state_dict(), clip_path)
    return {"sam_checkpoint": str(sam_path), "clip_pretrained": str(clip_path)}


class _ExtractLog(logging.Handler):
    """Keeps the extraction's end-of-run line (images, regions, seconds, time split) as figures."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def summary(self) -> dict:
        for line in reversed(self.lines):
            m = re.search(r"(\d+) images, (\d+) regions in ([\d.]+)s.*?time split: (.*)$", line)
            if m:
                images, regions, seconds = int(m[1]), int(m[2]), float(m[3])
                return {"images_per_s": images / seconds, "regions_per_s": regions / seconds, "split": m[4]}
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", action="store_true", help="measure the workers' CPU cost only (no model)")
    ap.add_argument("--backbones", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--boxes", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--storage", default="wds", choices=["wds", "zarr"])
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="also write the figures here (scripts/gpu_check.sh reads them)")
    args = ap.parse_args()
    if args.data_path:
        data_path(images_per_size=max(1, args.images // 2), repeats=5)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp / "data", args.images, args.boxes, args.image_size)
        weights = random_weights(args.backbones, tmp) if args.random_weights else {}
        cfg = ExtractConfig(dataset=dataset, out=tmp / "shards", backbones=args.backbones, storage=args.storage,
                            shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers, **weights)
        lines = _ExtractLog()
        logging.getLogger("regionspot.extract").addHandler(lines)
        logging.getLogger("regionspot.extract").setLevel(logging.INFO)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run_extract(cfg)
        wall = time.perf_counter() - start
        shards = ShardSet(out)
        nbytes = sum(s["bytes"] for s in shards.manifest["shards"])
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"device: {device}; preset {args.backbones}; {args.images} images of {args.image_size}px, "
              f"{args.boxes} boxes each; batch {args.batch_size}")
        print(f"wall (incl. model load and text embeddings): {wall:.1f}s")
        print(f"bytes per image: {nbytes / shards.num_images / 1024:.1f} KiB ({args.storage})")
        summary = lines.summary()
        print(f"extraction loop: {summary.get('images_per_s', 0):.1f} images/s, "
              f"{summary.get('regions_per_s', 0):.0f} regions/s; time split: {summary.get('split', '?')}")
        figures = {
            "device": device, "preset": args.backbones, "images": args.images, "boxes": args.boxes,
            "image_size": args.image_size, "batch_size": args.batch_size, "wall_s": wall,
            "kib_per_image": nbytes / shards.num_images / 1024, **summary,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
