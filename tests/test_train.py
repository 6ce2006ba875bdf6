"""The training stage: loss, schedule, stream, learnability, resume, DDP, refusals, logs, no backbones."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from train_fixtures import World, write_shardset
from typer.testing import CliRunner

from regionspot.cli import app
from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import load_head, save_head
from regionspot.models.head import RegionSpotHead
from regionspot.shards import loader
from regionspot.shards.loader import SampleRef, WorkerMemory, assemble, collate
from regionspot.shards.shardset import ShardSet
from regionspot.train.config import TrainConfig, load_recipe, resolve_config
from regionspot.train.loss import region_focal_loss
from regionspot.train.stream import DatasetReader, TrainStream
from regionspot.train.trainer import lr_at, run_train


@pytest.fixture(autouse=True)
def _one_thread():
    """The heads here are tiny: one intra-op thread is several times faster than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def text(world):
    return world.text()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, world, text):
    """60 images (every 6th without regions) in 9 shards of 7."""
    path = tmp_path_factory.mktemp("sets") / "small"
    return write_shardset(path, world.samples(60, 1, empty_every=6), text, shard_size=7)


def _cfg(path, out, **kw):
    base = dict(
        shards=[path],
        out=out,
        steps=8,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        lr_drop_steps=[],
        save_every=4,
        log_every=2,
        workers=0,
        shuffle_buffer=8,
        num_layers=1,
        num_heads=4,
        ff_dim=64,
    )
    return TrainConfig(**{**base, **kw})


def _same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# --- loss and schedule ---------------------------------------------------------------------------------
def _official_focal(inputs, targets, alpha=0.25, gamma=2):
    """regionspot/modeling/regionspot.py: sigmoid_focal_loss(...) * n_box, on [b, n_box, K]."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * ce * ((1 - p_t) ** gamma)
    n_box = inputs.shape[1]
    return loss.mean(1).sum() / n_box * n_box


def test_focal_loss_is_reduced_as_the_official_code():
    logits = 20 * torch.randn(2, 3, 4)
    labels = torch.tensor([[1, 0, -1], [2, -1, -1]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = sum(
        _official_focal(logits[b : b + 1, :n], F.one_hot(labels[b : b + 1, :n], 4).float())
        for b, n in ((0, 2), (1, 1))
    )
    torch.testing.assert_close(region_focal_loss(logits, labels, mask), expected)
    poisoned = logits.clone()
    poisoned[1, 2] = float("nan")  # padding never reaches the sum
    torch.testing.assert_close(region_focal_loss(poisoned, labels, mask), expected)
    unknown = torch.tensor([[1, -1, -1], [2, -1, -1]])  # a real region with label -1: all negatives
    all_neg = _official_focal(
        logits[:1, :2], torch.stack([F.one_hot(torch.tensor(1), 4).float(), torch.zeros(4)])[None]
    )
    assert region_focal_loss(
        logits[:1], unknown[:1], mask[:1] | torch.tensor([[True, True, False]])
    ) == pytest.approx(float(all_neg))


def test_learning_rate_warms_up_and_drops_like_detectron2():
    cfg = TrainConfig(shards=["x"], lr=1.0, warmup_steps=10, warmup_factor=0.01, lr_drop_steps=[20, 30])
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(5, cfg) == pytest.approx(0.01 * 0.5 + 0.5)
    assert [lr_at(s, cfg) for s in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_recipes_hold_the_paper_values_and_flags_override():
    for name in ("bb-stage1", "bb-stage2", "bl-stage1", "bl-stage2"):
        cfg = resolve_config(name, shards=["s"])
        assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.grad_clip) == (
            450_000,
            16,
            2.5e-5,
            1e-4,
            1.0,
        )
        assert (cfg.warmup_steps, cfg.lr_drop_steps, cfg.focal_alpha, cfg.focal_gamma) == (
            1000,
            [350_000, 420_000],
            0.25,
            2,
        )
    assert resolve_config("bl-stage1", shards=["s"], lr=1e-4, steps=None).lr == 1e-4


# --- the stream ----------------------------------------------------------------------------------------
def _keys(batch_iter, n):
    return [list(next(batch_iter)[1].keys) for _ in range(n)]


def test_readers_share_the_shards_of_an_epoch_and_skip_empty_images(small_set):
    shards = ShardSet(small_set)
    regions = {i: [s.key for s in shards.iter_samples([i]) if s.num_regions] for i in range(9)}
    seen = []
    for g in range(3):  # 9 shards, 3 readers: 3 shards each per epoch
        reader = DatasetReader(shards, 0, g, 3, seed=5, buffer=1)
        assert len(reader._schedule(0)) == 3
        seen += [reader.next().key for _ in range(sum(len(regions[i]) for i in reader._schedule(0)))]
    assert sorted(seen) == sorted(
        k for keys in regions.values() for k in keys
    )  # each image with regions once
    reader = DatasetReader(shards, 0, 0, 1, seed=5, buffer=1)
    plain = [reader.next().key for _ in range(40)]
    reader = DatasetReader(shards, 0, 0, 1, seed=5, buffer=16)
    shuffled = [reader.next().key for _ in range(24)]
    assert set(shuffled) <= set(plain) and shuffled != plain[:24]  # the buffer reorders nearby images
    reader = DatasetReader(shards, 0, 0, 1, seed=6, buffer=1)
    assert [reader.next().key for _ in range(40)] != plain  # another seed, another shard order
    starving = [
        DatasetReader(shards, 0, g, 20, seed=5, buffer=2) for g in range(20)
    ]  # more readers than shards
    assert all(r.next().num_regions for r in starving)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_continues_exactly_from_its_position(small_set, tmp_path, world, text, workers):
    other = write_shardset(
        tmp_path / "other", World(k=3).samples(30, 2, key_prefix="o"), World(k=3).text(), shard_size=10
    )
    sets = [ShardSet(small_set), ShardSet(other)]
    straight = TrainStream(sets, 3, workers=workers, seed=3, buffer=5)
    _keys(straight, 5)
    position = straight.position()
    rest = _keys(straight, 6)
    datasets = set()
    resumed = TrainStream(
        sets, 3, workers=workers, seed=3, buffer=5, position=json.loads(json.dumps(position))
    )
    for expected in rest:
        d, batch = next(resumed)
        datasets.add(d)
        assert list(batch.keys) == expected
        assert batch.labels.max() < (4 if d == 0 else 3)  # labels of that dataset's vocabulary
    assert datasets == {0, 1}
    before = straight.position(back=1)
    assert _keys(TrainStream(sets, 3, workers=workers, seed=3, buffer=5, position=before), 1) == [rest[-1]]
    for s in (straight, resumed):
        s.close()
    with pytest.raises(RegionSpotError, match="same --gpus and --workers"):
        TrainStream(sets, 3, workers=workers + 3, seed=3, position=position)


def _same_batches(a, b):
    assert a.keys == b.keys and a.image_ids == b.image_ids and a.sizes == b.sizes
    for name in ("sam_tokens", "sam_iou", "clip_map", "region_mask", "labels", "boxes", "scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_workers_reuse_their_batch_memory_and_batches_stay_intact(tmp_path, world, text):
    """A worker writes its batches into a few reused buffers; batches the trainer still holds are copies,
    so holding more of them than there are buffers changes nothing: one worker gives exactly the batches
    of the in-process stream (both are one reader), batches of several sizes included."""
    samples = world.samples(16, 2, regions=2) + world.samples(16, 3, regions=7, key_prefix="b")
    sets = [ShardSet(write_shardset(tmp_path / "set", samples, text, shard_size=8))]
    here = TrainStream(sets, 4, workers=0, seed=1, buffer=1)  # batches of one shard: of 2 or of 7 regions
    worker = TrainStream(sets, 4, workers=1, seed=1, buffer=1, prefetch=1)  # 3 buffers
    held = [next(worker) for _ in range(12)]
    for (d, batch), (d2, want) in zip(held, (next(here) for _ in range(12)), strict=True):
        assert d == d2
        _same_batches(batch, want)
    assert len({b.region_mask.shape[1] for _, b in held}) > 1  # batches of several sizes passed through
    for s in (here, worker):
        s.close()


def test_a_shared_batch_is_received_once_then_found_by_its_buffer(small_set, monkeypatch):
    """The pin thread's path without a GPU: a worker's buffer crosses to the main process with its first
    batch only; later batches in it name it, and their pinned copies are what the worker wrote."""
    flat = loader._flat  # pinning needs CUDA; the copy is what matters here
    monkeypatch.setattr(loader, "_flat", lambda nbytes, pin=False, memory=None: flat(nbytes, False, memory))
    ss = ShardSet(small_set)
    memory = WorkerMemory(1, prefetch=0)  # two buffers, used in turn
    memory.worker = 0
    refs = [SampleRef(ss.reader(0), k) for k in range(len(ss.reader(0)))]

    def through_the_other_buffer():
        memory.receive(memory.hand_over(assemble(refs[5:6], memory=memory)[0]))

    first, _ = assemble(refs[:3], memory=memory)
    shared = memory.hand_over(first)
    assert shared.flat is not None
    pinned = shared.pin_memory()
    assert pinned.flat is None  # the pinned copy no longer holds the buffer
    _same_batches(memory.receive(pinned), assemble(refs[:3])[0])
    through_the_other_buffer()
    second, _ = assemble(refs[3:5], memory=memory)  # the first buffer again
    shared = memory.hand_over(second)
    assert shared.flat is None
    _same_batches(memory.receive(shared.pin_memory()), assemble(refs[3:5])[0])
    through_the_other_buffer()
    more = [SampleRef(ss.reader(1), k) for k in range(len(ss.reader(1)))]
    third, _ = assemble(refs + more, memory=memory)  # more than the buffer holds: it grows, and crosses again
    shared = memory.hand_over(third)
    assert shared.flat is not None
    _same_batches(memory.receive(shared), assemble(refs + more)[0])
    memory.close()


def test_no_room_for_shared_memory_is_one_line_with_the_fix(small_set, monkeypatch):
    def full(nbytes):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on device")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(full))
    memory = WorkerMemory(1, prefetch=0)
    memory.worker = 0
    reader = ShardSet(small_set).reader(0)
    with pytest.raises(RegionSpotError, match=r"shared memory .*No space left.*--shm-size=4g.*fewer --workers"):
        assemble([SampleRef(reader, 0)], memory=memory)


# --- the trainer ---------------------------------------------------------------------------------------
def _accuracy(run, samples, text):
    head, _, _ = load_head(run)
    batch = collate(samples)
    with torch.no_grad():
        logits = head(
            batch.sam_tokens[:, :, 0].float(),
            batch.clip_map.float(),
            torch.from_numpy(text),
            batch.region_mask,
        )
    return float((logits.argmax(-1) == batch.labels)[batch.region_mask].float().mean())


@pytest.mark.slow
def test_the_head_learns_to_fuse_where_and_what(tmp_path, world, text):
    """A region's class is what the CLIP map holds at the region's cell; only its SAM token says which
    cell. The head must combine both: with maps shuffled between images it stays at chance."""
    held_out = world.samples(100, 99)
    cfg = dict(
        steps=400, batch_size=16, lr=2e-3, warmup_steps=20, save_every=400, log_every=100, shuffle_buffer=64
    )
    train = write_shardset(tmp_path / "train", world.samples(400, 1), text, shard_size=50)
    run = run_train(_cfg(train, tmp_path / "run", **cfg))
    control = write_shardset(
        tmp_path / "control", world.samples(400, 1, shuffle_maps=True), text, shard_size=50
    )
    control_run = run_train(_cfg(control, tmp_path / "control_run", **cfg))
    accuracy, control_accuracy = _accuracy(run, held_out, text), _accuracy(control_run, held_out, text)
    assert accuracy >= 0.9, accuracy
    assert control_accuracy < 1.5 / world.k, control_accuracy
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [100, 200, 300, 400]
    assert {"loss", "lr", "samples_per_s"} <= set(lines[-1]) and lines[-1]["loss"] < lines[0]["loss"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(small_set, tmp_path, workers):
    straight = run_train(_cfg(small_set, tmp_path / "straight", steps=8, workers=workers))
    run_train(_cfg(small_set, tmp_path / "resumed", steps=4, workers=workers))
    state = torch.load(tmp_path / "resumed/checkpoints/step-0000004/trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["positions"]) == 1
    resumed = run_train(_cfg(small_set, tmp_path / "resumed", steps=8, workers=workers, resume=True))
    a, _, _ = load_head(straight)
    b, _, _ = load_head(resumed)
    _same_weights(a, b)
    assert (resumed / "checkpoints" / "last").read_text().strip() == "step-0000008"
    for name in ("step-0000004", "step-0000008"):
        saved = yaml.safe_load((resumed / "checkpoints" / name / "config.yaml").read_text())
        assert saved["steps"] in (4, 8) and saved["head"]["num_layers"] == 1
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    with pytest.raises(RegionSpotError, match="--resume"):
        run_train(_cfg(small_set, tmp_path / "straight"))
    # a run stopped after its step-8 checkpoint had been written but before `last` moved: resumes from 4
    (straight / "checkpoints" / "last").write_text("step-0000004\n")
    again = run_train(_cfg(small_set, straight, steps=8, workers=workers, resume=True))
    _same_weights(load_head(again)[0], a)
    steps = [json.loads(x)["step"] for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # the lines logged after step 4 were replaced, not repeated


def test_refusals_before_any_step(tmp_path, world, text, small_set):
    a = write_shardset(tmp_path / "a", world.samples(10, 2), text, fingerprint="one")
    b = write_shardset(tmp_path / "b", world.samples(10, 3), text, fingerprint="two", clip_model="other")
    with pytest.raises(RegionSpotError, match="clip.model differs"):
        run_train(_cfg(a, tmp_path / "r", shards=[a, b]))
    with pytest.raises(RegionSpotError, match="no shards in"):
        run_train(_cfg(tmp_path / "missing", tmp_path / "r"))
    empty = write_shardset(tmp_path / "empty", world.samples(4, 2, empty_every=1), text)
    with pytest.raises(RegionSpotError, match="no regions to train on"):
        run_train(_cfg(empty, tmp_path / "r"))
    other = tmp_path / "other_head"
    save_head(RegionSpotHead(32, 16, num_layers=1, ff_dim=64), other, "two")
    with pytest.raises(RegionSpotError, match="--init .*other_head"):
        run_train(_cfg(a, tmp_path / "r", init=other))
    wide = tmp_path / "wide_head"
    save_head(RegionSpotHead(48, 16, num_layers=1, ff_dim=64), wide, "one")
    with pytest.raises(RegionSpotError, match="clip_width 48"):
        run_train(_cfg(a, tmp_path / "r", init=wide))
    with pytest.raises(RegionSpotError, match="mix_weights has 1 values for 2"):
        c = write_shardset(tmp_path / "c", world.samples(10, 4), text, fingerprint="one")
        run_train(_cfg(a, tmp_path / "r", shards=[a, c], mix_weights=[1.0]))
    (tmp_path / "bad.yaml").write_text("steps: 3\nlearning_rate: 1\n")
    with pytest.raises(RegionSpotError, match="unknown recipe key.*learning_rate"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RegionSpotError, match="recipe 'nope' not found; available: bb-stage1"):
        load_recipe("nope")
    assert not (tmp_path / "r").exists()  # nothing was written by any refused run


def test_init_from_a_checkpoint_and_an_official_pth(tmp_path, small_set):
    first = run_train(_cfg(small_set, tmp_path / "stage1", steps=2, save_every=2))
    second = run_train(
        _cfg(
            small_set,
            tmp_path / "stage2",
            steps=1,
            init=first / "checkpoints" / "last",
            lr=1e-9,
            warmup_steps=0,
            num_layers=3,
        )
    )
    a, _, _ = load_head(first)
    b, fingerprint, _ = load_head(second)
    assert b.config()["num_layers"] == 1 and fingerprint == "fp"  # the architecture comes with --init
    assert (a.projector.weight - b.projector.weight).abs().max() < 1e-5
    official = tmp_path / "regionspot_tiny.pth"
    torch.save({"model": a.to_official_state_dict()}, official)
    third = run_train(_cfg(small_set, tmp_path / "stage2b", steps=1, init=official))
    assert load_head(third)[1] == "fp"


def test_a_non_finite_loss_stops_naming_step_and_images(tmp_path, world, text):
    samples = world.samples(16, 4)
    for s in samples[8:]:
        s.clip_map[:] = np.float16(np.inf)
    shards = write_shardset(tmp_path / "s", samples, text, shard_size=8)
    with pytest.raises(RegionSpotError, match=r"loss is nan at step (\d+) \(rank 0, images 000\d\d") as info:
        run_train(_cfg(shards, tmp_path / "run", steps=20, shuffle_buffer=1, save_every=100))
    step = int(info.value.args[0].split("at step ")[1].split(" ")[0])
    saved = tmp_path / "run" / "checkpoints" / f"step-{step:07d}"
    assert (saved / "trainer_state.pt").exists() and (
        tmp_path / "run/checkpoints/last"
    ).read_text().strip() == saved.name
    head, _, _ = load_head(saved)
    assert all(torch.isfinite(p).all() for p in head.parameters())
    with pytest.raises(RegionSpotError, match=f"at step {step} "):  # the resumed run meets the same batch
        run_train(_cfg(shards, tmp_path / "run", steps=20, shuffle_buffer=1, save_every=100, resume=True))


def _state_equal(a, b):
    """Two trainer_state.pt contents hold the same step, data positions, RNG states and optimiser state."""
    assert (a["step"], a["world"], a["positions"]) == (b["step"], b["world"], b["positions"])
    for x, y in zip(a["rng"], b["rng"], strict=True):
        assert torch.equal(x["cpu"], y["cpu"])
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=0, atol=0)


def test_a_non_finite_loss_between_log_steps_stops_with_the_state_before_it(tmp_path, world, text):
    """Read back every 5 steps, a NaN at step 3 still names step 3 and its images, and the saved state is
    exactly what a clean run of 3 steps saves (weights, optimiser, data position, RNG)."""
    samples = world.samples(16, 4)  # one shard read in order (buffer 1): step 3 = images 12-15
    for s in samples[12:]:
        s.clip_map[:] = np.float16(np.inf)
    shards = write_shardset(tmp_path / "s", samples, text, shard_size=16)
    kw = dict(steps=20, shuffle_buffer=1, save_every=100, log_every=5)
    with pytest.raises(
        RegionSpotError, match=r"loss is nan at step 3 \(rank 0, images 00012, 00013, 00014, 00015\)"
    ):
        run_train(_cfg(shards, tmp_path / "run", **kw))
    saved = tmp_path / "run/checkpoints/step-0000003"
    assert (tmp_path / "run/checkpoints/last").read_text().strip() == saved.name
    clean = run_train(_cfg(shards, tmp_path / "clean", **{**kw, "steps": 3}))
    _same_weights(load_head(saved)[0], load_head(clean)[0])
    _state_equal(
        torch.load(saved / "trainer_state.pt", weights_only=True),
        torch.load(clean / "checkpoints/step-0000003/trainer_state.pt", weights_only=True),
    )
    assert not (tmp_path / "run/metrics.jsonl").read_text()  # no line of a window holding the bad step
    with pytest.raises(RegionSpotError, match="at step 3 "):  # the resumed run meets the same batch
        run_train(_cfg(shards, tmp_path / "run", **kw, resume=True))


def _crowded(world, n_images=8, regions=2000):
    """Images of 4 regions, the first one with `regions` (its scores number them: 0, 1, 2, ...)."""
    samples = world.samples(n_images, 9)
    big = samples[0]
    rows = np.arange(regions) % big.num_regions
    for name in ("boxes", "labels", "sam_tokens", "sam_iou"):
        setattr(big, name, getattr(big, name)[rows])
    big.scores = np.arange(regions, dtype=np.float32)
    return samples


def test_max_regions_keeps_a_seeded_subset_of_a_crowded_image(tmp_path, world, text, monkeypatch):
    shards = write_shardset(tmp_path / "s", _crowded(world), text, shard_size=4)
    sets = [ShardSet(shards)]

    def big_rows(stream, n, cap=64):  # the scores of the crowded image's kept regions, each time it comes
        out = []
        for _ in range(n):
            _, batch = next(stream)
            assert batch.region_mask.shape[1] <= cap and int(batch.region_mask.sum(1).max()) <= cap
            for i, key in enumerate(batch.keys):
                if key == "00000":
                    out.append(batch.scores[i][batch.region_mask[i]].tolist())
        stream.close()
        return out

    first = big_rows(TrainStream(sets, 4, seed=1, buffer=2, max_regions=64), 6)
    assert len(first) == 3  # 8 images, 4 a batch: once in each of 3 epochs
    for kept in first:
        assert len(kept) == 64 and kept == sorted(set(kept))  # 64 distinct regions, in stored order
    assert first[0] != first[1]  # another visit, another subset
    assert big_rows(TrainStream(sets, 4, seed=1, buffer=2, max_regions=64), 6) == first
    assert len(big_rows(TrainStream(sets, 4, seed=1, buffer=2), 2, cap=2000)[0]) == 2000  # no cap: all

    widths = []

    def spy(logits, labels, *args):
        widths.append(labels.shape[1])
        return region_focal_loss(logits, labels, *args)

    monkeypatch.setattr("regionspot.train.trainer.region_focal_loss", spy)
    runs = [run_train(_cfg(shards, tmp_path / f"run{i}", steps=4, max_regions=64)) for i in range(2)]
    assert max(widths) == 64  # the crowded image was trained on, capped
    _same_weights(load_head(runs[0])[0], load_head(runs[1])[0])
    with pytest.raises(RegionSpotError, match="--max-regions 0: must be at least 1"):
        _cfg(shards, tmp_path / "r", max_regions=0).check()


def _leftovers(run):
    return sorted(p.relative_to(run) for p in run.rglob("*.tmp-*"))


def _full_disk_leaves_the_finished_checkpoint(run, error):
    assert str(run / "checkpoints") in str(error.value) and "no space left on device" in str(error.value)
    assert "\n" not in str(error.value)
    assert _leftovers(run) == []
    assert not (run / "checkpoints/step-0000004").exists()
    assert (run / "checkpoints/last").read_text().strip() == "step-0000002"
    head, _, _ = load_head(run / "checkpoints/step-0000002")
    state = torch.load(run / "checkpoints/step-0000002/trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in head.parameters())


def test_a_full_disk_while_saving_says_so_and_keeps_the_finished_checkpoints(
    tmp_path, small_set, monkeypatch
):
    write_bytes = pathlib.Path.write_bytes
    saves = []

    def half_then_full(path, data):  # the second trainer state meets a full disk half-way
        if path.name.startswith(".trainer_state.pt.tmp-"):
            saves.append(path)
            if len(saves) == 2:
                write_bytes(path, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_full)
    with pytest.raises(RegionSpotError) as error:
        run_train(_cfg(small_set, tmp_path / "run", steps=6, save_every=2))
    _full_disk_leaves_the_finished_checkpoint(tmp_path / "run", error)


def test_a_real_full_disk_while_saving(tmp_path, small_set):
    """The same on a small tmpfs, where the second checkpoint does not fit (safetensors or torch meet it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    measured = run_train(_cfg(small_set, tmp_path / "measure", steps=2, save_every=2))

    def pages(folder):  # what tmpfs charges: whole 4 KiB pages per file
        return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())

    checkpoint = pages(measured / "checkpoints/step-0000002")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = pages(measured) + 64 * 1024 + checkpoint // 2  # room for the first checkpoint, not the second
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(RegionSpotError) as error:
            run_train(_cfg(small_set, disk / "run", steps=6, save_every=2))
        _full_disk_leaves_the_finished_checkpoint(disk / "run", error)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_restart_before_the_first_checkpoint_cleans_what_killed_runs_left(tmp_path, small_set):
    run = tmp_path / "run"

    def steps():
        return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    run_train(_cfg(small_set, run, steps=4, log_every=1, save_every=100))
    assert steps() == [1, 2, 3, 4]
    gone = subprocess.Popen(["true"])
    gone.wait()
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint, mid-save
    stale = [
        run / f".config.yaml.tmp-{gone.pid}",
        run / f"checkpoints/.last.tmp-{gone.pid}",
        run / f"checkpoints/step-0000004/.trainer_state.pt.tmp-{gone.pid}",
    ]
    live = run / f"checkpoints/step-0000002/.head.safetensors.tmp-{os.getppid()}"  # another run's, alive
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    run_train(_cfg(small_set, run, steps=4, log_every=1, save_every=100, resume=True))
    assert steps() == [1, 2, 3, 4]  # the first lines are not repeated
    assert _leftovers(run) == [live.relative_to(run)]
    assert (run / "checkpoints/last").read_text().strip() == "step-0000004"
    shutil.rmtree(run / "checkpoints")
    run_train(_cfg(small_set, run, steps=3, log_every=1, save_every=100))  # a new run in the same folder
    assert steps() == [1, 2, 3]


def test_mixing_a_folder_of_sets_imports_no_backbone(tmp_path, world, text):
    write_shardset(tmp_path / "mixed" / "a", world.samples(20, 5, key_prefix="a"), text)
    write_shardset(
        tmp_path / "mixed" / "b",
        World(k=3).samples(20, 6, key_prefix="b", regions=2),
        World(k=3).text(),
        shard_size=5,
    )
    code = (
        "import sys, pathlib; from regionspot.train.config import TrainConfig; "
        "from regionspot.train.trainer import run_train; "
        f"run_train(TrainConfig(shards=[pathlib.Path({str(tmp_path / 'mixed')!r})], out=pathlib.Path({str(tmp_path / 'run')!r}), "
        "steps=6, batch_size=4, save_every=6, warmup_steps=1, workers=0, num_layers=1, ff_dim=32, log_every=1)); "
        "bad = [m for m in sys.modules if m.startswith(('segment_anything', 'open_clip', 'regionspot.models.sam', "
        "'regionspot.models.clip', 'regionspot.models.presets', 'regionspot.extract'))]; print('BACKBONES', bad)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BACKBONES []" in out.stdout
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["head"]["clip_width"] == 32 and config["fingerprint"] == "fp"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6


def test_three_tokens_per_region_train(tmp_path, text):
    three = World(tokens=3)
    shards = write_shardset(tmp_path / "t3", three.samples(12, 7), text, shard_size=6)
    run = run_train(_cfg(shards, tmp_path / "run", steps=2, save_every=2))
    assert load_head(run)[0].config()["clip_width"] == 32


def test_cli_train_and_convert_official(tmp_path, small_set):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--shards" in result.output and "--resume" in result.output
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "num_layers: 1\nff_dim: 32\nnum_heads: 4\nwarmup_steps: 1\nlr_drop_steps: []\nshuffle_buffer: 4\n"
    )
    result = runner.invoke(
        app,
        [
            "train",
            "--shards",
            str(small_set),
            "--recipe",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--save-every",
            "2",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["steps"], config["ff_dim"], config["seed"], config["lr"]) == (2, 32, 3, 2.5e-5)
    head, _, _ = load_head(tmp_path / "run")
    torch.save({"model": head.to_official_state_dict(), "iteration": 1}, tmp_path / "official.pth")
    result = runner.invoke(
        app, ["convert-official", str(tmp_path / "official.pth"), "-o", str(tmp_path / "converted")]
    )
    assert result.exit_code == 0, result.output
    converted, fingerprint, imported = load_head(tmp_path / "converted", fingerprint_if_imported="chosen")
    assert (fingerprint, imported) == ("chosen", True)
    _same_weights(converted, head)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, small_set):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "num_layers: 1\nff_dim: 32\nnum_heads: 4\nwarmup_steps: 1\nlr_drop_steps: []\nshuffle_buffer: 4\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "regionspot.cli",
        "train",
        "--shards",
        str(small_set),
        "--recipe",
        str(recipe),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--workers",
        "1",
        "--gpus",
        "2",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "run/checkpoints/step-0000004/trainer_state.pt", weights_only=True)
    assert (
        state["step"] == 4 and state["world"] == 2 and len(state["positions"]) == 2 and len(state["rng"]) == 2
    )
    assert state["positions"][0]["readers"] != state["positions"][1]["readers"]  # ranks read different images
    out = subprocess.run(
        [*cmd[:-6], "--steps", "6", "--save-every", "2", "--workers", "1", "--gpus", "2", "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/last").read_text().strip() == "step-0000006"


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_a_non_finite_loss(tmp_path, world, text):
    """The non-finite flag is never all-reduced per step, yet both ranks stop at the same read-back."""
    samples = world.samples(32, 4)
    for s in samples[24:]:
        s.clip_map[:] = np.float16(np.inf)
    shards = write_shardset(tmp_path / "s", samples, text, shard_size=8)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "num_layers: 1\nff_dim: 32\nnum_heads: 4\nwarmup_steps: 1\nlr_drop_steps: []\nshuffle_buffer: 1\n"
    )
    cmd = [sys.executable, "-m", "regionspot.cli", "train", "--shards", str(shards), "--recipe", str(recipe)]
    cmd += ["--out", str(tmp_path / "run"), "--steps", "30", "--batch-size", "4", "--save-every", "100"]
    cmd += ["--log-every", "5", "--workers", "1", "--gpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    lines = [x for x in out.stderr.splitlines() if "loss is nan at step" in x]
    assert out.returncode == 1 and len(lines) == 2 and lines[0] == lines[1], out.stderr[-3000:]
    step = int(lines[0].split("at step ")[1].split(" ")[0])
    saved = tmp_path / "run" / "checkpoints" / f"step-{step:07d}"
    assert (tmp_path / "run/checkpoints/last").read_text().strip() == saved.name
    state = torch.load(saved / "trainer_state.pt", weights_only=True)
    assert state["step"] == step and len(state["positions"]) == 2
    assert all(torch.isfinite(p).all() for p in load_head(saved)[0].parameters())


def test_trainer_runs_on_extracted_toy_shards(toy_shards, tmp_path):
    run = run_train(
        TrainConfig(
            shards=[toy_shards["toy"]],
            out=tmp_path / "run",
            steps=4,
            batch_size=4,
            save_every=4,
            warmup_steps=1,
            lr_drop_steps=[],
            workers=0,
            shuffle_buffer=8,
            ff_dim=64,
        )
    )
    head, fingerprint, _ = load_head(run)
    shards = ShardSet(toy_shards["toy"])
    assert fingerprint == shards.fingerprint
    assert head.config()["clip_width"] == shards.backbones["clip"]["width"]
    assert head.logit_scale == shards.logit_scale


# --- reads that stop training: the per-sample index's checks ------------------------------------------
def _train_cli(monkeypatch, capsys, shards, out, *flags):
    """`regionspot train` through the console entry point: (exit code, stderr lines)."""
    from regionspot.cli import main

    argv = ["regionspot", "train", "--shards", str(shards), "--out", str(out), "--steps", "20",
            "--batch-size", "4", "--workers", "0", "--save-every", "100", "--log-every", "100", *flags]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def _member(shards, sample, field):
    """(offset in the tar, size) of one member's data, from the shard's record."""
    entry = json.loads((shards / "shard-000000.json").read_text())["sample_index"][sample]
    rel, size = entry["members"][["json", "boxes", "labels", "scores", "sam_tokens", "sam_iou", "clip_map"].index(field)]
    return entry["offset"] + rel, size


@pytest.fixture
def faulty(tmp_path, world, text):
    """A one-shard set of 12 images (4 regions each) and its tar's bytes, to damage."""
    shards = write_shardset(tmp_path / "faulty", world.samples(12, 8), text, shard_size=12)
    return shards, shards / "shard-000000.tar", (shards / "shard-000000.tar").read_bytes()


def _stopped(code, err, tar, key, problem):
    """Exit 1 with one line (beside the progress bar) naming the shard, the sample and the fix."""
    errors = [line for line in err if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert errors[0].startswith(f"error: {tar}: sample {key}: {problem}"), err
    assert errors[0].endswith(f"run 'regionspot shards verify {tar.parent}'")


def test_a_truncated_shard_stops_training(faulty, tmp_path, monkeypatch, capsys):
    shards, tar, data = faulty
    entry = json.loads((shards / "shard-000000.json").read_text())["sample_index"][6]
    tar.write_bytes(data[: entry["offset"]])  # cut at a sample boundary: what tarfile read silently
    code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / "run")
    _stopped(code, err, tar, "00006", "the shard ends at byte")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_flipped_bit_stops_training_unless_reads_are_not_verified(faulty, tmp_path, monkeypatch, capsys, workers):
    shards, tar, data = faulty
    offset, size = _member(shards, 3, "clip_map")
    flipped = bytearray(data)
    flipped[offset + size // 2] ^= 0x04  # one bit of one CLIP feature
    tar.write_bytes(bytes(flipped))
    code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / "run", "--workers", str(workers))
    _stopped(code, err, tar, "00003", "checksum mismatch")
    if workers == 0:  # the user's choice for sets checked with `shards verify`: only the checksum is skipped
        code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / "unchecked", "--no-verify-reads")
        assert code == 0, err
        assert yaml.safe_load((tmp_path / "unchecked" / "config.yaml").read_text())["verify_reads"] is False


def test_a_changed_shape_header_stops_training_even_unverified(faulty, tmp_path, monkeypatch, capsys):
    shards, tar, data = faulty
    offset, size = _member(shards, 4, "sam_tokens")
    changed = bytearray(data)
    at = data.index(b"(4, 1, 256)", offset, offset + size)
    changed[at : at + 11] = b"(4, 1, 255)"  # same length: only the shape says otherwise
    tar.write_bytes(bytes(changed))
    code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / "run")
    _stopped(code, err, tar, "00004", "checksum mismatch")
    code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / "unchecked", "--no-verify-reads")
    _stopped(code, err, tar, "00004", "sam_tokens is float16[4, 1, 255], expected float16[4, 1, 256]")


def test_a_label_outside_the_vocabulary_stops_training(tmp_path, world, text, monkeypatch, capsys):
    samples = world.samples(12, 8)
    samples[5].labels[2] = 99  # written as extracted: its checksum is right
    shards = write_shardset(tmp_path / "labels", samples, text, shard_size=12)
    for flags in ((), ("--no-verify-reads",)):
        code, err = _train_cli(monkeypatch, capsys, shards, tmp_path / f"run{len(flags)}", *flags)
        _stopped(code, err, shards / "shard-000000.tar", "00005", "label 99 is outside the vocabulary [-1, 4)")
