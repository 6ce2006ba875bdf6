"""The extraction stage: shards from the toy dataset with the tiny backbones."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from regionspot.errors import RegionSpotError
from regionspot.extract.config import ExtractConfig
from regionspot.extract.loop import shard_batches
from regionspot.extract.runner import run_extract
from regionspot.shards.identity import IDENTITY
from regionspot.shards.manifest import MANIFEST, is_finished
from regionspot.shards.shardset import ShardSet
from regionspot.shards.verify import verify_shardset
from regionspot.shards.writer import ShardSetWriter


def _cfg(root, out, **kw):
    base = dict(dataset="toy", data_root=root, out=out, backbones="tiny", shard_size=4, limit=12, gpus=0)
    return ExtractConfig(**{**base, **kw})


def _samples(path):
    return {s.key: s for s in ShardSet(path).iter_samples()}


def test_batches_never_span_shards():
    batches = shard_batches([0, 2], shard_size=5, num_images=12, batch_size=3)
    assert batches == [[0, 1, 2], [3, 4], [10, 11]]


def test_toy_shards_match_the_dataset(toy_shards, toy_root):
    from regionspot.data.datasets import open_dataset

    records = open_dataset("toy", toy_root).records()[:48]
    shards = ShardSet(toy_shards["toy"])
    assert shards.num_images == 48 and len(shards.shard_paths) == 3
    assert verify_shardset(toy_shards["toy"]) == []
    samples = list(shards.iter_samples())
    assert [s.key for s in samples] == [r.key for r in records]
    for s, r in zip(samples, records, strict=True):
        np.testing.assert_array_equal(s.boxes, r.boxes)
        np.testing.assert_array_equal(s.labels, r.labels)
        assert s.sam_tokens.shape == (len(r.boxes), 1, 256) and s.sam_tokens.dtype == np.float16
        assert np.isfinite(s.sam_tokens.astype(np.float32)).all()
    text = shards.text_embeddings()
    assert text.shape[0] == len(shards.vocabulary) == 10
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)


def test_wds_and_zarr_hold_identical_arrays(toy_root, tmp_path):
    wds = _samples(run_extract(_cfg(toy_root, tmp_path / "wds", storage="wds", sam_tokens=3)))
    zarr = _samples(run_extract(_cfg(toy_root, tmp_path / "zarr", storage="zarr", sam_tokens=3)))
    assert wds.keys() == zarr.keys() and len(wds) == 12
    for key, a in wds.items():
        for name, value in a.arrays().items():
            np.testing.assert_array_equal(value, getattr(zarr[key], name), err_msg=f"{key}.{name}")
        assert a.sam_tokens.shape[1] == 3


def test_a_different_run_is_refused_unless_overwrite(toy_root, tmp_path):
    run_extract(_cfg(toy_root, tmp_path / "s"))
    with pytest.raises(RegionSpotError, match="different run.*run.*--overwrite") as e:
        run_extract(_cfg(toy_root, tmp_path / "s", shard_size=6))
    assert f"run.shard_size differs: 6 here, 4 in {tmp_path / 's' / IDENTITY}" in str(e.value)
    with pytest.raises(RegionSpotError) as e:
        run_extract(_cfg(toy_root, tmp_path / "s", limit=5))
    assert f"(run.limit differs: 5 here, 12 in {tmp_path / 's' / IDENTITY});" in str(e.value)
    out = run_extract(_cfg(toy_root, tmp_path / "s", shard_size=6, overwrite=True))
    assert len(ShardSet(out).shard_paths) == 2


def test_two_cpu_workers_cover_every_image_once(toy_root, tmp_path):
    out = run_extract(_cfg(toy_root, tmp_path / "two", workers=2, shard_size=3))
    keys = [s.key for s in ShardSet(out).iter_samples()]
    from regionspot.data.datasets import open_dataset

    assert sorted(keys) == [r.key for r in open_dataset("toy", toy_root).records()[:12]]
    assert len(keys) == len(set(keys))


def test_corrupt_image_is_skipped_and_counted(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root / "toy", root / "toy")
    from regionspot.data.datasets import open_dataset

    victim = open_dataset("toy", root).records()[1]
    victim.path.write_bytes(b"not an image")
    out = run_extract(_cfg(root, tmp_path / "s"))
    manifest = ShardSet(out).manifest
    assert [s["key"] for s in manifest["dataset"]["skipped"]] == [victim.key]
    assert manifest["dataset"]["skipped"][0]["reason"]
    assert ShardSet(out).num_images == 11


def _extract_cmd(root, out):
    return [sys.executable, "-m", "regionspot.cli", "extract", "--dataset", "toy", "--data-root", str(root),
            "--out", str(out), "--backbones", "tiny", "--shard-size", "2", "--limit", "40", "--batch-size", "1",
            "--gpus", "0"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(toy_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_extract_cmd(toy_root, straight), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_extract_cmd(toy_root, resumed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    writer = ShardSetWriter(resumed, "wds")

    def done() -> int:
        return sum(writer.is_complete(i) for i in range(20))  # 40 images, 2 per shard

    deadline = time.time() + 120
    while done() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_finished(resumed), "the run finished before it could be killed"
    assert 3 <= done() < 20
    subprocess.run(_extract_cmd(toy_root, resumed), check=True, env=env, capture_output=True)

    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name
    assert json.loads((straight / MANIFEST).read_text()) == json.loads((resumed / MANIFEST).read_text())


def test_a_shard_lock_is_free_once_its_owner_is_gone(tmp_path):
    from regionspot.shards.locks import ShardLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from regionspot.shards.locks import ShardLock; "
         f"ShardLock({str(tmp_path)!r}, 3).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = ShardLock(tmp_path, 3)
        assert not lock.acquire(blocking=False)  # a live owner
        assert lock.owner().endswith(str(holder.pid))
        assert ShardLock(tmp_path, 4).acquire(blocking=False)  # another shard's lock is another lock
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(blocking=False)  # the kernel dropped the dead owner's lock
    lock.release()


@pytest.mark.slow
def test_two_unranked_runs_into_one_out_share_the_work(toy_root, tmp_path):
    """A second `extract` started by mistake into the same --out neither kills nor repeats the first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_extract_cmd(toy_root, straight), check=True, env=env, capture_output=True)
    shared = tmp_path / "shared"
    first = subprocess.Popen(_extract_cmd(toy_root, shared), env=env, stderr=subprocess.PIPE, text=True)
    writer = ShardSetWriter(shared, "wds")
    deadline = time.time() + 120
    while not writer.is_complete(0) and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)  # the first is under way: the second meets a shard in flight
    second = subprocess.Popen(_extract_cmd(toy_root, shared), env=env, stderr=subprocess.PIPE, text=True)
    errors = [first.communicate()[1], second.communicate()[1]]
    assert (first.returncode, second.returncode) == (0, 0), errors
    assert verify_shardset(shared) == []
    for name in sorted(p.name for p in straight.iterdir()):
        assert (straight / name).read_bytes() == (shared / name).read_bytes(), name
    assert not list(shared.glob(".*"))  # no temporary file, no lock left


def test_a_full_disk_ends_in_one_line_and_keeps_the_finished_shards(toy_root, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    measured = run_extract(_cfg(toy_root, tmp_path / "measure", limit=8))

    def pages(*names):  # what tmpfs charges: whole 4 KiB pages per file
        return sum(-(-(measured / n).stat().st_size // 4096) * 4096 for n in names)

    disk = tmp_path / "disk"
    disk.mkdir()
    # the identity, the first shard and its record fit; half the second shard does not
    size = pages(IDENTITY, "shard-000000.tar", "shard-000000.json") + pages("shard-000001.tar") // 2
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(RegionSpotError) as error:
            run_extract(_cfg(toy_root, disk / "s", limit=8))
        message = str(error.value)
        assert "no space left on device" in message and str(disk / "s") in message and "\n" not in message
        assert not [p.name for p in (disk / "s").iterdir() if ".tmp-" in p.name]  # nothing half-written
        writer = ShardSetWriter(disk / "s", "wds")
        assert writer.is_complete(0) and not writer.is_complete(1)
        assert (disk / "s" / "shard-000000.tar").read_bytes() == (measured / "shard-000000.tar").read_bytes()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- the image path: workers read, the device decodes ---------------------------------------------

EXIF_ORIENTATION = 0x0112


class ListSink:
    """Stands in for ShardSink: keeps what the loop hands over."""

    def __init__(self):
        self.samples, self.skipped, self.calls = {}, {}, []

    def begin(self, index):
        self.calls.append(("begin", index))

    def write(self, sample):
        self.samples[sample.key] = sample

    def skip(self, key, reason):
        self.skipped[key] = reason

    def end(self):
        self.calls.append(("end",))


@pytest.fixture(scope="module")
def tiny():
    from regionspot.models.presets import load_backbones, resolve_backbones

    return load_backbones(resolve_backbones("tiny"))


def _extract_records(records, backbones, batch_size=3):
    import torch

    from regionspot.extract.loop import extract_shards

    sink = ListSink()
    counts = extract_shards(records, [0], len(records), backbones, sink, batch_size=batch_size, num_workers=0,
                            masks=False, device=torch.device("cpu"))
    assert sink.calls == [("begin", 0), ("end",)]
    return sink, counts


def _smooth(height, width, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))


def _record(path, width, height, key=None, boxes=((4, 6, 30, 40), (10, 2, 50, 20))):
    from regionspot.data.records import ImageRecord

    key = key or path.stem
    boxes = np.asarray(boxes, np.float32)
    return ImageRecord(key=key, image_id=key, file_name=path.name, path=path, width=width, height=height,
                       boxes=boxes, labels=np.zeros(len(boxes), np.int32))


def test_orient_applies_exif_orientations_as_pil_does():
    import torch
    from PIL import Image, ImageOps

    from regionspot.extract.decode import orient

    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        im = Image.fromarray(pixels)
        im.getexif()[EXIF_ORIENTATION] = orientation
        expected = np.asarray(ImageOps.exif_transpose(im))
        turned = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(turned, expected, err_msg=f"orientation {orientation}")


def test_workers_pass_jpegs_to_the_device_and_decode_the_rest(tmp_path):
    import torch
    from PIL import Image

    from regionspot.data.images import load_record_image
    from regionspot.extract.decode import ImageFiles, decode_images

    pixels = _smooth(48, 64, 1)
    rgb = Image.fromarray(pixels)
    rgb.save(tmp_path / "plain.jpg", quality=90)
    rgb.save(tmp_path / "full_chroma.jpg", quality=90, subsampling=0)
    rgb.save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    rgb.convert("L").save(tmp_path / "grey.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.save(tmp_path / "lossless.png")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rgb.save(tmp_path / "turned.jpg", exif=exif)  # annotated on the stored grid below: stays as stored
    data = (tmp_path / "plain.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    rgb.save(tmp_path / "wrong_size.jpg")

    names = ["plain", "full_chroma", "progressive", "grey", "turned", "truncated", "cmyk", "lossless", "deep",
             "corrupt", "wrong_size"]
    records = [_record(next(tmp_path.glob(f"{n}.*")), 64, 48) for n in names]
    records[-1] = _record(tmp_path / "wrong_size.jpg", 60, 48)
    files = [ImageFiles(records)[i] for i in range(len(records))]
    by_name = dict(zip(names, files, strict=True))
    assert [n for n, f in by_name.items() if f.jpeg is not None] == names[:6]
    assert [n for n, f in by_name.items() if f.image is not None] == ["cmyk", "lossless", "deep"]
    assert by_name["turned"].orientation == 1
    assert "cannot decode" in by_name["corrupt"].error
    assert "the annotation says 60x48" in by_name["wrong_size"].error

    images, on_cpu = decode_images(files, records, torch.device("cpu"))
    assert on_cpu == 3  # the fallbacks: CMYK, PNG, 16-bit
    for name, record, image in zip(names, records, images, strict=True):
        if name in ("truncated", "corrupt", "wrong_size"):
            assert isinstance(image, str) and str(record.path) in image, name
            continue
        # torchvision decodes with libjpeg-turbo, PIL's decoder, with the same settings: equal pixels
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64), name
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), load_record_image(record), err_msg=name)
    assert "truncated" in images[names.index("truncated")]


def test_device_decode_gives_the_samples_of_the_cpu_decode(toy_root, tiny, monkeypatch):
    from regionspot.data.datasets import open_dataset
    from regionspot.extract import decode
    from regionspot.extract.loop import CPU_DECODED

    records = open_dataset("toy_val", toy_root).records()[:7]  # JPEGs
    assert all(r.path.suffix == ".jpg" for r in records)
    on_device, counts = _extract_records(records, tiny)
    monkeypatch.setattr(decode, "read_jpeg", lambda record, size_mismatch="skip": None)
    on_cpu, cpu_counts = _extract_records(records, tiny)
    assert counts[CPU_DECODED] == 0 and cpu_counts[CPU_DECODED] == 7
    assert list(on_device.samples) == [r.key for r in records] == list(on_cpu.samples)
    for key, sample in on_device.samples.items():
        for name, value in sample.arrays().items():  # the CPU's JPEG decoders agree exactly: no tolerance
            np.testing.assert_array_equal(value, getattr(on_cpu.samples[key], name), err_msg=f"{key}.{name}")


def test_exif_rotated_images_give_the_samples_of_their_upright_pixels(tmp_path, tiny):
    from PIL import Image

    from regionspot.data.images import load_image
    from regionspot.extract.loop import CPU_DECODED

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # shown turned 90 degrees clockwise
    upright = _smooth(80, 60, 2)  # 60 wide, 80 high
    Image.fromarray(upright).save(tmp_path / "upright.png")
    Image.fromarray(np.rot90(upright)).save(tmp_path / "turned.png", exif=exif)  # lossless: the CPU decode
    Image.fromarray(np.rot90(_smooth(80, 60, 3))).save(tmp_path / "turned.jpg", exif=exif, quality=90)
    Image.fromarray(np.rot90(load_image(tmp_path / "turned.jpg"), k=-1)).save(tmp_path / "upright_jpeg.png")
    data = (tmp_path / "turned.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a JPEG after all")

    names = ["upright", "turned", "turned_jpeg", "upright_jpeg", "truncated", "corrupt"]
    paths = ["upright.png", "turned.png", "turned.jpg", "upright_jpeg.png", "truncated.jpg", "corrupt.jpg"]
    records = [_record(tmp_path / p, 60, 80, key=n) for n, p in zip(names, paths, strict=True)]
    sink, counts = _extract_records(records, tiny, batch_size=1)  # one image a batch: the same arithmetic
    assert counts[CPU_DECODED] == 3  # the PNGs
    assert sorted(sink.skipped) == ["corrupt", "truncated"]
    assert all(str(tmp_path) in reason for reason in sink.skipped.values())
    for a, b in (("turned", "upright"), ("turned_jpeg", "upright_jpeg")):
        assert sink.samples[a].width == 60 and sink.samples[a].height == 80
        for name, value in sink.samples[a].arrays().items():
            np.testing.assert_array_equal(value, getattr(sink.samples[b], name), err_msg=f"{a}.{name}")
    assert not np.array_equal(sink.samples["upright"].clip_map, sink.samples["upright_jpeg"].clip_map)


@pytest.mark.gpu
def test_the_device_path_on_cuda_matches_the_cpu(toy_root, tmp_path):
    import torch
    from PIL import Image

    from regionspot.data.datasets import open_dataset
    from regionspot.extract.decode import ImageFiles, decode_images
    from regionspot.extract.loop import CPU_DECODED, extract_shards
    from regionspot.models.presets import load_backbones, resolve_backbones

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8
    Image.fromarray(_smooth(48, 64, 4)).save(tmp_path / "turned.jpg", exif=exif, quality=90)
    records = [*open_dataset("toy_val", toy_root).records()[:5], _record(tmp_path / "turned.jpg", 48, 64)]
    files = [ImageFiles(records)[i] for i in range(len(records))]
    on_gpu, gpu_fallbacks = decode_images(files, records, torch.device("cuda"))
    on_cpu, _ = decode_images(files, records, torch.device("cpu"))
    assert gpu_fallbacks == 0
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):  # nvJPEG's IDCT and upsampling differ from libjpeg's
        assert gpu.is_cuda and gpu.shape == cpu.shape
        assert (gpu.cpu().float() - cpu.float()).abs().mean() < 2

    backbones = load_backbones(resolve_backbones("tiny"), device=torch.device("cuda"))
    sink = ListSink()
    counts = extract_shards(records, [0], len(records), backbones, sink, batch_size=4, num_workers=2, masks=False,
                            device=torch.device("cuda"))
    assert counts[CPU_DECODED] == 0 and list(sink.samples) == [r.key for r in records]
    for record in records:
        sample = sink.samples[record.key]
        assert sample.sam_tokens.shape == (len(record.boxes), 1, 256) and sample.clip_map.dtype == np.float16
        assert np.isfinite(sample.sam_tokens.astype(np.float32)).all()
