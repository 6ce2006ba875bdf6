"""Benchmark `regionspot extract`: images/s, regions/s, the time split and bytes per image.

Generates a synthetic COCO-format dataset (JPEG images of --image-size px on the long side with
--boxes boxes each) and runs the real extraction stage on it. Full-size presets need weights; with
--random-weights the script saves randomly initialised SAM / CLIP weights of the preset's shapes to
temporary files (the speed is the same as with the released weights).

    python scripts/bench_extract.py --backbones tiny --images 64                # CPU smoke run
    python scripts/bench_extract.py --backbones bl --random-weights --images 2000 --boxes 16 \
        --image-size 1024 --batch-size 32 --workers 12                         # one GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionspot.extract.config import ExtractConfig
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--boxes", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--storage", default="wds", choices=["wds", "zarr"])
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp / "data", args.images, args.boxes, args.image_size)
        weights = random_weights(args.backbones, tmp) if args.random_weights else {}
        cfg = ExtractConfig(dataset=dataset, out=tmp / "shards", backbones=args.backbones, storage=args.storage,
                            shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers, **weights)
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
        print("images/s, regions/s and the time split are in the summary line above")


if __name__ == "__main__":
    main()
