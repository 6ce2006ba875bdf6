"""The training stage: loss, stream, learnability, resume, DDP, refusals, no backbones."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import load_head
from regionspot.shards.manifest import build_manifest, write_json_atomic
from regionspot.shards.schema import Sample, record_name, shard_name
from regionspot.shards.storage import open_writer, shard_checksum
from regionspot.train.config import TrainConfig, load_recipe
from regionspot.train.loss import region_focal_loss
from regionspot.train.trainer import run_train

GRID, C, D, K = 4, 128, 32, 4


def write_shardset(path, samples, text, fingerprint="fp", shard_size=20, clip_model="synthetic"):
    """A shard set in the layout `regionspot extract` writes."""
    path.mkdir(parents=True)
    records = []
    for i in range(0, len(samples), shard_size):
        index = i // shard_size
        writer = open_writer("wds", path / shard_name(index, "wds"))
        for s in samples[i : i + shard_size]:
            writer.write(s)
        writer.close()
        sha, nbytes = shard_checksum(path / shard_name(index, "wds"))
        chunk = samples[i : i + shard_size]
        records.append({"index": index, "name": shard_name(index, "wds"), "samples": len(chunk),
                        "regions": sum(s.num_regions for s in chunk), "bytes": nbytes, "sha256": sha, "skipped": []})
        write_json_atomic(path / record_name(index), records[-1])
    identity = {
        "dataset": {"name": path.name, "sources": {}}, "proposals": {"source": "gt"}, "storage": "wds",
        "backbones": {"sam": {"model": "synthetic", "tokens": 1},
                      "clip": {"model": clip_model, "image_size": 32, "width": C,
                               "embed_dim": text.shape[1], "logit_scale": 100.0},
                      "fingerprint": fingerprint},
        "run": {"shard_size": shard_size},
    }
    vocab = [{"id": k + 1, "name": f"c{k}", "synonyms": [], "frequency": "f"} for k in range(len(text))]
    write_json_atomic(path / "manifest.json", build_manifest(identity, records, vocab))
    np.save(path / "text_embeddings.npy", text.astype(np.float32), allow_pickle=False)
    return path


def synthetic_samples(n_images, seed, shuffle_maps=False):
    """Each region's class is the prototype the CLIP map holds at the region's cell; the SAM token says
    only which cell. Neither alone decides the class. Like a real CLIP map, every map token also
    carries its position (a fixed code per cell)."""
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(K, C))
    positions = rng.normal(size=(GRID * GRID, C))
    cell_codes = rng.normal(size=(GRID * GRID, 256))
    rng = np.random.default_rng(seed + 1)
    maps, samples = [], []
    for i in range(n_images):
        classes = rng.integers(0, K, GRID * GRID)  # the class at every cell
        cells_map = prototypes[classes] + positions + 0.1 * rng.normal(size=(GRID * GRID, C))
        clip_map = np.concatenate([np.zeros((1, C)), cells_map])
        cells = rng.choice(GRID * GRID, 4, replace=False)
        tokens = cell_codes[cells] + 0.1 * rng.normal(size=(4, 256))
        maps.append(clip_map)
        samples.append(Sample(
            key=str(i), image_id=i, file_name=f"{i}.jpg", width=64, height=64,
            boxes=np.tile(np.array([0, 0, 8, 8], np.float32), (4, 1)), labels=classes[cells].astype(np.int32),
            scores=np.ones(4, np.float32), sam_tokens=tokens[:, None].astype(np.float16),
            sam_iou=np.ones((4, 1), np.float16), clip_map=clip_map.astype(np.float16),
        ))
    if shuffle_maps:  # the control: every image gets another image's map
        order = np.roll(np.arange(n_images), 1)
        for s, j in zip(samples, order, strict=True):
            s.clip_map = maps[j].astype(np.float16)
    return samples


@pytest.fixture(scope="module")
def text():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, K)))
    return q.T  # K orthonormal class embeddings


def _accuracy(run, samples, text):
    head, _, _ = load_head(run / "checkpoints" / "last")
    correct = total = 0
    with torch.no_grad():
        for s in samples:
            logits = head(torch.from_numpy(s.sam_tokens[:, 0].astype(np.float32))[None],
                          torch.from_numpy(s.clip_map.astype(np.float32))[None], torch.from_numpy(text).float())
            correct += int((logits[0].argmax(-1).numpy() == s.labels).sum())
            total += s.num_regions
    return correct / total


def _cfg(shards, out, **kw):
    base = dict(shards=[shards], out=out, steps=20, batch_size=8, lr=1e-3, warmup_steps=5, lr_drop_steps=[],
                save_every=10, log_every=5, workers=2)
    return TrainConfig(**{**base, **kw})


def test_focal_loss_is_reduced_as_the_official_code():
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[1, 0, -1], [2, -1, -1]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    from torchvision.ops import sigmoid_focal_loss

    expected = 0
    for b, n in ((0, 2), (1, 1)):
        targets = torch.nn.functional.one_hot(labels[b, :n], 4).float()
        expected += sigmoid_focal_loss(logits[b, :n], targets, 0.25, 2.0, reduction="none").mean(0).sum()
    torch.testing.assert_close(region_focal_loss(logits, labels, mask), expected)


@pytest.mark.slow
def test_the_head_learns_to_fuse_where_and_what(tmp_path, text):
    train = write_shardset(tmp_path / "train", synthetic_samples(400, 0), text)
    held_out = synthetic_samples(460, 0)[400:]
    run = run_train(_cfg(train, tmp_path / "run", steps=400, batch_size=16, save_every=400, log_every=50))
    accuracy = _accuracy(run, held_out, text)
    control = write_shardset(tmp_path / "control", synthetic_samples(400, 0, shuffle_maps=True), text)
    control_run = run_train(_cfg(control, tmp_path / "control_run", steps=400, batch_size=16, save_every=400))
    control_accuracy = _accuracy(control_run, held_out, text)
    assert accuracy >= 0.9, accuracy
    assert control_accuracy < 1.5 / K, control_accuracy
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s"} <= set(lines[-1]) and lines[-1]["step"] == 400
    assert list((run / "tensorboard").iterdir())


def test_resume_continues_exactly(tmp_path, text):
    shards = write_shardset(tmp_path / "s", synthetic_samples(60, 1), text, shard_size=7)
    straight = run_train(_cfg(shards, tmp_path / "straight", steps=20, save_every=10))
    partial = _cfg(shards, tmp_path / "resumed", steps=10, save_every=10)
    run_train(partial)
    resumed = run_train(_cfg(shards, tmp_path / "resumed", steps=20, save_every=10, resume=True))
    a, _, _ = load_head(straight)
    b, _, _ = load_head(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(RegionSpotError, match="--resume"):
        run_train(_cfg(shards, tmp_path / "straight"))


def test_refusals_before_any_step(tmp_path, text):
    a = write_shardset(tmp_path / "a", synthetic_samples(10, 2), text, fingerprint="one")
    b = write_shardset(tmp_path / "b", synthetic_samples(10, 3), text, fingerprint="two", clip_model="other")
    with pytest.raises(RegionSpotError, match="clip.model differs"):
        run_train(TrainConfig(shards=[a, b], out=tmp_path / "r"))
    with pytest.raises(RegionSpotError, match="regionspot extract"):
        run_train(TrainConfig(shards=[tmp_path / "empty_does_not_exist"], out=tmp_path / "r"))
    (tmp_path / "bad.yaml").write_text("steps: 3\nlearning_rate: 1\n")
    with pytest.raises(RegionSpotError, match="unknown recipe key.*learning_rate"):
        load_recipe(tmp_path / "bad.yaml")
    assert load_recipe("bl-stage1")["lr"] == 2.5e-5


def test_a_non_finite_loss_stops_naming_step_and_images(tmp_path, text):
    samples = synthetic_samples(16, 4)
    for s in samples:
        s.clip_map[:] = np.float16(np.inf)
    shards = write_shardset(tmp_path / "s", samples, text)
    with pytest.raises(RegionSpotError, match=r"at step 0 \(images .*"):
        run_train(_cfg(shards, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "step-0000000" / "head.safetensors").exists()


def test_training_mixes_a_folder_of_sets_and_imports_no_backbone(tmp_path, text):
    write_shardset(tmp_path / "mixed" / "a", synthetic_samples(20, 5), text)
    write_shardset(tmp_path / "mixed" / "b", synthetic_samples(20, 6), text)
    code = (
        "import sys, pathlib; from regionspot.train.config import TrainConfig; "
        "from regionspot.train.trainer import run_train; "
        f"run_train(TrainConfig(shards=[pathlib.Path({str(tmp_path / 'mixed')!r})], out=pathlib.Path({str(tmp_path / 'run')!r}), "
        "steps=4, batch_size=4, save_every=4, warmup_steps=1)); "
        "bad = [m for m in ('segment_anything', 'open_clip', 'regionspot.models.sam', 'regionspot.models.clip') if m in sys.modules]; "
        "print('BACKBONES', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "BACKBONES []" in out.stdout


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, text):
    shards = write_shardset(tmp_path / "s", synthetic_samples(30, 7), text, shard_size=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "regionspot.cli", "train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--steps", "6",
           "--batch-size", "4", "--save-every", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step-0000006" / "trainer_state.pt").exists()
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000006" / "trainer_state.pt", weights_only=True)
    assert len(state["streams"]) == 2 and state["step"] == 6


def test_trainer_runs_on_extracted_toy_shards(toy_shards, tmp_path):
    run = run_train(TrainConfig(shards=[toy_shards["toy"]], out=tmp_path / "run", steps=6, batch_size=4, save_every=6,
                                warmup_steps=2, lr_drop_steps=[]))
    head, fingerprint, _ = load_head(run)
    from regionspot.shards.shardset import ShardSet

    assert fingerprint == ShardSet(toy_shards["toy"]).fingerprint
