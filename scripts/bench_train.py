"""Training throughput: streaming shards vs (a) the I/O ceiling, (b) the compute ceiling, (c) an official-style
loop that runs the CLIP image tower online every step; the stream alone per core; a step's peak memory.

    python scripts/bench_train.py --size bl --images 256 --steps 20            # synthetic shards, bl widths
    python scripts/bench_train.py --shards shards/o365 --steps 50              # a real shard set
    python scripts/bench_train.py --compare-s3 --size bl --images 512          # streaming: S3 vs local disk
    python scripts/bench_train.py --shards s3://bucket/sets/o365               # that set vs a local copy

(a) reads every shard file of the set (raw bytes, no decoding) and divides the rate by the bytes per image:
    once after dropping the files from the page cache (cold: the disk's rate) and once again (warm: memory).
    The ratio (s)/min(a, b) uses the cold figure.
(b) steps the same head and optimiser on batches already collated in memory (the same batches (s) reads).
(s) is what `regionspot train` does: TrainStream (readers, shuffle buffer, collate) + head + focal loss + AdamW.
(c) the official loop's extra work: a frozen CLIP image tower (open_clip, random weights: only the cost
    matters) on B images of S x S every step, then the same head step.
Prints samples/s and regions/s for each, and the ratios (s)/min(a, b) and (s)/(c).

Per core (one process, no model; rates per CPU-second of the process, so other load on the machine does not
skew them, and the best of a few alternating rounds):
    raw read samples/s: Y             the shard files read into memory (warm page cache)
    stream samples/s per core: X      TrainStream (workers=0, --batch-size, checksums verified), no model
    stream / raw read = X / Y         (goal >= 0.80)
    and the stream again without the checksums (`--no-verify-reads`), and the reads and checksums alone:
    each sample's bytes in one `preadv` into a row of a reused batch, then XXH3, and nothing else (no
    Python per sample beyond the loop): the most a verified stream could reach on this CPU.
    stream with one worker, CPU per sample: what a DataLoader worker and the main process spend together.
Peak memory per step: one training step of the head on 16 images of 300 regions at the --size widths,
above what the process held before it (CUDA: device memory; CPU: resident memory, Linux).

--compare-s3 (or --shards URL) prints instead one pass of TrainStream (no model) over the same set from an
object store and from local disk, and their ratio: see `compare_s3`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from regionspot.models.head import RegionSpotHead
from regionspot.shards.identity import run_identity
from regionspot.shards.index import checksum
from regionspot.shards.loader import collate
from regionspot.shards.location import Location, path_or_url
from regionspot.shards.schema import FEATURE_DTYPE, Sample
from regionspot.shards.shardset import ShardSet
from regionspot.shards.writer import ShardSetWriter
from regionspot.train.loss import region_focal_loss
from regionspot.train.stream import TrainStream

# CLIP widths per preset (DESIGN.md §2): token map L x C, embedding D, open_clip tower, image size
SIZES = {
    "bb": dict(L=197, C=768, D=512, clip="ViT-B-16-quickgelu", S=224),
    "bl": dict(L=257, C=1024, D=768, clip="ViT-L-14-quickgelu", S=224),
    "small": dict(L=50, C=768, D=512, clip="ViT-B-32-quickgelu", S=224),
}


def write_synthetic(path: Path, size: dict, images: int, regions: int, classes: int, shard_size: int) -> Path:
    """A shard set of random features with the widths of `size`, written as extract writes one."""
    rng = np.random.default_rng(0)

    def sample(i: int) -> Sample:
        return Sample(
            key=f"{i:07d}",
            image_id=i,
            file_name=f"{i}.jpg",
            width=640,
            height=480,
            boxes=np.tile(np.array([0, 0, 32, 32], np.float32), (regions, 1)),
            labels=rng.integers(0, classes, regions).astype(np.int32),
            scores=np.ones(regions, np.float32),
            sam_tokens=rng.normal(size=(regions, 1, 256)).astype(FEATURE_DTYPE),
            sam_iou=np.ones((regions, 1), FEATURE_DTYPE),
            clip_map=rng.normal(size=(size["L"], size["C"])).astype(FEATURE_DTYPE),
        )

    backbones = {
        "sam": {"model": "synthetic", "tokens": 1},
        "clip": {"model": "synthetic", "image_size": size["S"], "width": size["C"], "embed_dim": size["D"],
                 "logit_scale": 100.0},
        "fingerprint": "bench",
    }  # fmt: skip
    path.mkdir(parents=True)
    writer = ShardSetWriter(path, "wds")
    writer.claim(run_identity(dataset="bench", sources={}, proposals={"source": "gt"}, backbones=backbones,
                              shard_size=shard_size, storage="wds"))  # fmt: skip
    starts = range(0, images, shard_size)
    for index, start in enumerate(starts):
        writer.write_shard(index, (sample(i) for i in range(start, min(start + shard_size, images))))
    vocab = [{"id": k + 1, "name": f"c{k}", "synonyms": [], "frequency": "f"} for k in range(classes)]
    text = rng.normal(size=(classes, size["D"]))
    writer.finish(len(starts), vocab, text / np.linalg.norm(text, axis=1, keepdims=True), templates="random")
    return path


class Stepper:
    """One training step of the head (the trainer's arithmetic: float32 on CPU, bf16 autocast on CUDA)."""

    def __init__(self, width: int, embed_dim: int, text: np.ndarray, device: torch.device):
        self.device = device
        self.head = RegionSpotHead(width, embed_dim).to(device).train()
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=2.5e-5, weight_decay=1e-4)
        self.text = torch.from_numpy(text).to(device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def __call__(self, batch, clip_map: torch.Tensor | None = None) -> float:
        batch = batch.to(self.device, non_blocking=True)
        tokens = batch.sam_tokens.float()[:, :, 0]  # (B, N, 256)
        clip_map = batch.clip_map.float() if clip_map is None else clip_map  # (B, L, C)
        with self.autocast:
            logits = self.head(tokens, clip_map, self.text, batch.region_mask)  # (B, N, K)
        loss = region_focal_loss(logits.float(), batch.labels, batch.region_mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
        self.opt.step()
        return loss.item()


def stepper(shards: ShardSet, device: torch.device) -> Stepper:
    clip = shards.backbones["clip"]
    return Stepper(int(clip["width"]), int(clip["embed_dim"]), shards.text_embeddings(), device)


def read_files(files: list[Path]) -> None:
    """Read the files into memory and drop the bytes: the I/O ceiling's and the raw read's work."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def per_core(shards: ShardSet, batch_size: int, rounds: int = 3, steps: int = 24) -> dict[str, float]:
    """Samples per CPU-second, the best of `rounds` alternating rounds, of:
    "raw": the shard files read into memory; "stream", "unverified": TrainStream with and without the
    checksums; "floor": the least work of a verified stream, nothing else: every sample, in a shuffled
    order, read with one `preadv` into a row of a reused batch of `batch_size` rows and checksummed."""
    files = [Path(f) for f in shards.shard_paths]
    readers = [shards.reader(i) for i in range(len(files))]
    spans = [(f, e["offset"], e["length"]) for f, r in zip(files, readers, strict=True) for e in r.entries]
    np.random.default_rng(0).shuffle(spans)
    row = max(length for _, _, length in spans)
    rows = np.empty((batch_size, row), np.uint8)
    best = dict.fromkeys(("raw", "stream", "unverified", "floor"), 0.0)

    def floor() -> None:
        fds = {f: os.open(f, os.O_RDONLY) for f in files}
        try:
            for i, (f, offset, length) in enumerate(spans):
                view = rows[i % batch_size, :length]
                os.preadv(fds[f], [view], offset)
                checksum([view])
        finally:
            for fd in fds.values():
                os.close(fd)

    def rate(work) -> float:
        t0 = time.process_time()
        work()
        return shards.num_images / (time.process_time() - t0)

    def streamed(verify: bool) -> float:
        batches = TrainStream([shards], batch_size, workers=0, seed=0, buffer=64, verify=verify)
        for _ in range(2):
            next(batches)
        t0 = time.process_time()
        for _ in range(steps):
            next(batches)
        rate = steps * batch_size / (time.process_time() - t0)
        batches.close()
        return rate

    for _ in range(rounds):
        for name, measure in (("raw", lambda: rate(lambda: read_files(files))), ("stream", lambda: streamed(True)),
                              ("unverified", lambda: streamed(False)), ("floor", lambda: rate(floor))):  # fmt: skip
            best[name] = max(best[name], measure())
    return best


def with_a_worker(shards: ShardSet, batch_size: int, steps: int = 100) -> tuple[float, float]:
    """(worker, main process) CPU microseconds per sample of TrainStream with one DataLoader worker (no
    model): the worker reads and assembles, the main process receives each batch and copies it out. Two
    runs of different lengths, so that starting and stopping the worker cancel out; a worker's CPU is
    counted once it has exited."""

    def run(n: int) -> tuple[float, float]:
        main0, child0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        stream = TrainStream([shards], batch_size, workers=1, seed=0, buffer=64)
        for _ in range(n):
            next(stream)
        stream.close()
        del stream
        gc.collect()  # the DataLoader's iterator joins its worker when it goes
        main1, child1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        used = lambda a, b: b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime  # noqa: E731
        return used(child0, child1), used(main0, main1)

    short, long = run(10), run(10 + steps)
    samples = steps * batch_size
    return tuple(1e6 * (b - a) / samples for a, b in zip(short, long, strict=True))


def _resident_mib(field: str) -> float:
    """VmRSS or VmHWM (the peak since the last reset) of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_step_memory(size: dict, classes: int, device: torch.device, images: int = 16, regions: int = 300) -> float | None:
    """MiB one training step needs above what the process held before it (head, optimiser state, batch), for
    `images` images of `regions` regions at `size`'s widths; None where it cannot be measured."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(classes, size["D"])).astype(np.float32)
    step = Stepper(size["C"], size["D"], text / np.linalg.norm(text, axis=1, keepdims=True), device)
    samples = [
        Sample(key=str(i), image_id=i, file_name=f"{i}.jpg", width=640, height=480,
               boxes=np.tile(np.array([0, 0, 32, 32], np.float32), (regions, 1)),
               labels=rng.integers(0, classes, regions).astype(np.int32), scores=np.ones(regions, np.float32),
               sam_tokens=rng.normal(size=(regions, 1, 256)).astype(FEATURE_DTYPE),
               sam_iou=np.ones((regions, 1), FEATURE_DTYPE),
               clip_map=rng.normal(size=(size["L"], size["C"])).astype(FEATURE_DTYPE))
        for i in range(images)
    ]  # fmt: skip
    batch = collate(samples)
    step(batch)  # the optimiser's state exists from the first step on
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what the first step freed: the peak is measured afresh
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (Linux >= 4.0)
        before = _resident_mib("VmRSS")
        step(batch)
        return _resident_mib("VmHWM") - before
    except OSError:
        return None


def drop_page_cache(files: list[Path]) -> None:
    """Ask the OS to forget the files' cached pages (Linux; a no-op where unsupported)."""
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device) -> float:
    """Seconds per call of fn(i), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / steps


def copy_set(src: Location, dst: Location) -> None:
    """Every object of the shard set `src` (a zarr shard's files one by one) written to `dst`."""
    for name in src.list():
        for rel in src.files(name) if name.endswith(".zarr") else [""]:
            key = f"{name}/{rel}" if rel else name
            dst.write_bytes_atomic(key, bytes(src.read_bytes(key)))


def stream_rate(where: Location, batch_size: int, workers: int) -> float:
    """Samples/s of one pass of TrainStream (no model) over the set's images, from a fresh stream."""
    shards = ShardSet(where)
    batches = max(1, shards.num_images // batch_size)
    t0 = time.perf_counter()
    stream = TrainStream([shards], batch_size, workers=workers, seed=0, buffer=64)
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    return batches * batch_size / seconds


def compare_s3(args, size: dict) -> None:
    """Streaming from an object store vs local disk, the same set, one pass each (what a first epoch reads).

    With --shards s3://... (or another URL): that set, and a copy of it on local disk. Otherwise the
    --shards DIR (default: a synthetic set) is uploaded to moto's S3 server, started here on 127.0.0.1:
    loopback, not a network, so the ratio is the cost of the S3 protocol and client (s3fs, one request per
    ranged read, retries armed), not of a real network's latency and bandwidth.
    """
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if isinstance(args.shards, str):  # a URL
            remote = Location.parse(args.shards)
            local = Location.parse(Path(tmp) / "local")
            copy_set(remote, local)
        else:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

            local = Location.parse(
                args.shards
                or write_synthetic(Path(tmp) / "bench", size, args.images, args.regions, args.classes, 64)
            )
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            remote = Location.parse("s3://bench/set")
            copy_set(local, remote)
        try:
            rates = {}
            for name, where in (
                ("local disk", local),
                (f"S3 ({'moto, loopback' if server else remote})", remote),
            ):
                rates[name] = stream_rate(where, args.batch_size, args.workers)
                print(f"stream samples/s from {name}: {rates[name]:.0f}")
            first, second = rates.values()
            print(
                f"S3 / local disk = {second / first:.2f}  (workers {args.workers}, batch {args.batch_size})"
            )
        finally:
            if server is not None:
                server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shards",
        type=path_or_url,
        help="a shard set, a directory or a URL (default: write a synthetic one)",
    )
    p.add_argument(
        "--size", choices=sorted(SIZES), default="bl", help="widths of the synthetic set and tower"
    )
    p.add_argument("--images", type=int, default=512, help="images in the synthetic set")
    p.add_argument("--regions", type=int, default=16, help="regions per synthetic image (O365 has ~16)")
    p.add_argument("--classes", type=int, default=365)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-official", action="store_true", help="skip (c) (it needs open_clip)")
    p.add_argument("--compare-s3", action="store_true",
                   help="stream the set from moto's S3 server on loopback vs local disk (needs moto[server], s3fs)")  # fmt: skip
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size]
    if args.compare_s3 or isinstance(args.shards, str):  # a URL
        compare_s3(args, size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.shards or write_synthetic(
            Path(tmp) / "bench", size, args.images, args.regions, args.classes, shard_size=64
        )
        shards = ShardSet(path)
        bs, n = args.batch_size, args.steps
        regions_per_image = shards.num_regions / max(shards.num_images, 1)
        print(
            f"device {device}; {shards.num_images} images, {regions_per_image:.1f} regions/image, "
            f"batch {bs}, {n} timed steps after {args.warmup}"
        )

        # (a) the I/O ceiling: raw reads of all shard files, first with the files dropped from the page
        # cache (posix_fadvise DONTNEED: no root needed; the disk, or whatever caches below the OS), then warm
        files = [Path(f) for f in shards.shard_paths]
        nbytes = sum(f.stat().st_size for f in files)
        per_image = nbytes / shards.num_images
        io_rates = {}
        for cache in ("cold", "warm"):
            if cache == "cold":
                drop_page_cache(files)
            t0 = time.perf_counter()
            read_files(files)
            io_s = time.perf_counter() - t0
            io_rates[cache] = nbytes / io_s / per_image
            print(
                f"(a) I/O ceiling ({cache} page cache): {nbytes / io_s / 2**20:.0f} MiB/s / "
                f"{per_image / 1024:.0f} KiB per image = {io_rates[cache]:.0f} images/s"
            )
        io_rate = io_rates["cold"]

        # (s) streaming, as the trainer does
        stream = TrainStream(
            [shards], bs, workers=args.workers, seed=0, buffer=64, pin_memory=device.type == "cuda"
        )
        step = stepper(shards, device)
        kept = []

        def streamed(i):
            _, batch = next(stream)
            if len(kept) < 8:
                kept.append(batch)
            step(batch)

        s_stream = timed(streamed, n, args.warmup, device)
        stream.close()

        # (b) the compute ceiling: the same step on batches already in memory
        step = stepper(shards, device)
        s_compute = timed(lambda i: step(kept[i % len(kept)]), n, args.warmup, device)

        rows = [("(s) streaming", bs / s_stream), ("(b) compute ceiling", bs / s_compute)]

        # (c) official-style: the frozen CLIP tower online every step, then the same head step
        if not args.skip_official:
            import open_clip

            tower = open_clip.create_model(size["clip"], pretrained=None).visual.to(device).eval()
            tower.output_tokens = True
            tower.requires_grad_(False)
            step = stepper(shards, device)
            # the head's width must match the tower's for (c); the synthetic widths are the tower's
            images = torch.randn(bs, 3, size["S"], size["S"], device=device)

            def official(i):
                batch = kept[i % len(kept)]
                with torch.no_grad(), step.autocast:
                    _, tokens = tower(images)  # (B, L-1, C): the cost of the official loop's CLIP pass
                step(batch, clip_map=tokens.float())

            s_official = timed(official, max(2, n // 4), 1, device)
            rows.append(("(c) official-style (CLIP online)", bs / s_official))
        rows.append(("(a) I/O ceiling, cold cache", io_rates["cold"]))
        rows.append(("(a) I/O ceiling, warm cache", io_rates["warm"]))
        for name, rate in rows:
            print(f"{name:36s} {rate:9.1f} images/s  {rate * regions_per_image:10.0f} regions/s")
        stream_rate = bs / s_stream
        bound = min(io_rate, bs / s_compute)
        print(f"streaming / min(a cold, b) = {stream_rate / bound:.2f}  (goal >= 0.90)")
        if not args.skip_official:
            print(f"streaming / official-style = {stream_rate / (bs / s_official):.1f}x")

        # per core: the stream alone (workers=0, no model) against reading the files into memory
        rates = per_core(shards, bs)
        raw = rates["raw"]
        print(f"raw read samples/s: {raw:.0f}")
        print(f"stream samples/s per core: {rates['stream']:.0f}")
        print(f"stream / raw read = {rates['stream'] / raw:.2f}  (goal >= 0.80)")
        print(f"stream samples/s per core, --no-verify-reads: {rates['unverified']:.0f} "
              f"({rates['unverified'] / raw:.2f} of the raw read)")  # fmt: skip
        print(f"read + checksum alone samples/s per core: {rates['floor']:.0f} ({rates['floor'] / raw:.2f} of the "
              "raw read: a verified stream's ceiling)")  # fmt: skip
        worker, main = with_a_worker(shards, bs)
        print(f"stream with one worker, CPU per sample: {worker + main:.0f} us (worker {worker:.0f}, main process "
              f"{main:.0f}: receiving and copying out)")  # fmt: skip
    peak = peak_step_memory(size, args.classes, device)
    shown = "not measured on this system" if peak is None else f"{peak:.0f} MiB"
    print(f"peak memory per step (16 images x 300 regions, {args.size}): {shown}")


if __name__ == "__main__":
    main()
