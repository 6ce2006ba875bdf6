"""Shard sets at a URL: extract, train, eval and `shards info|verify` against a real S3 API on loopback
(moto's server with fault injection, tests/s3_server.py; s3fs is the client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from regionspot.cli import app, main
from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location
from regionspot.shards.shardset import ShardSet
from regionspot.shards.verify import verify_shardset

REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES, SHARD_SIZE = 8, 4  # toy_val: two shards
SECRET = "s3cr3t-never-shown"  # moto takes any credentials: a secret that must not appear anywhere
OPTIONS = {"key": "testing", "secret": SECRET}


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory):
    from regionspot.data.toy import ensure_toy

    root = tmp_path_factory.mktemp("toy_val_root")
    ensure_toy(root, "val", num_images=VAL_IMAGES)
    return root


def _extract(toy_val, out, **kw):
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract

    cfg = ExtractConfig(dataset="toy_val", data_root=toy_val, out=out, backbones="tiny", shard_size=SHARD_SIZE,
                        gpus=0, **kw)  # fmt: skip
    return run_extract(cfg)


def _extract_args(toy_val, out) -> list[str]:
    return ["extract", "--dataset", "toy_val", "--data-root", str(toy_val), "--out", out, "--backbones", "tiny",
            "--shard-size", str(SHARD_SIZE), "--gpus", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sets(s3_module, toy_val, tmp_path_factory):
    """toy_val extracted twice: to local disk, and through the CLI to s3:// with --storage-options."""
    local = _extract(toy_val, tmp_path_factory.mktemp("local") / "toy_val")
    url = f"{s3_module.url}/sets/toy_val"
    result = CliRunner().invoke(app, [*_extract_args(toy_val, url), "--storage-options", json.dumps(OPTIONS)])
    assert result.exit_code == 0, result.output
    assert f"shards: {url}" in result.output and SECRET not in result.output
    return local, url


def _objects(where) -> dict[str, bytes]:
    """Every object of a shard set (a zarr shard's files by relative name) and its bytes."""
    loc = Location.parse(where)
    out = {}
    for name in loc.list():
        files = loc.files(name) if name.endswith(".zarr") else [""]
        for rel in files:
            key = f"{name}/{rel}" if rel else name
            out[key] = bytes(loc.read_bytes(key))
    return out


def _same_samples(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.key, x.image_id, x.width, x.height, x.masks) == (
            y.key,
            y.image_id,
            y.width,
            y.height,
            y.masks,
        )
        for name in ("boxes", "labels", "scores", "sam_tokens", "sam_iou", "clip_map"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


# --- extract -------------------------------------------------------------------------------------------


def test_extract_into_s3_writes_the_bytes_of_a_local_run(sets):
    local, url = sets
    remote = _objects(url)
    assert remote == _objects(local)  # identity, shards, records, text embeddings, manifest: byte for byte
    assert sorted(remote) == ["identity.json", "manifest.json", "shard-000000.json", "shard-000000.tar",
                              "shard-000001.json", "shard-000001.tar", "text_embeddings.npy"]  # fmt: skip
    shards = ShardSet(url)
    assert isinstance(shards.path, Location) and str(shards.path) == url and shards.num_images == VAL_IMAGES
    _same_samples(shards.iter_samples(), ShardSet(local).iter_samples())

    runner = CliRunner()
    info = runner.invoke(app, ["shards", "info", url, "--storage-options", json.dumps(OPTIONS)])
    assert (
        info.exit_code == 0 and url in info.output and "toy_val" in info.output and SECRET not in info.output
    )
    ok = runner.invoke(app, ["shards", "verify", url])
    assert ok.exit_code == 0 and f"ok: 2 shards, {VAL_IMAGES} images" in ok.output


def test_a_killed_upload_leaves_no_record_and_the_same_command_finishes_the_set(
    sets, s3_module, toy_val, tmp_path, monkeypatch
):
    """The record upload of shard 1 fails past its retries (the run dies between a shard and its record);
    the same command again redoes shard 1 only and writes the set of an uninterrupted run, removing the
    scratch copy a killed process left of that shard (and no live process's copy)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"{s3_module.url}/sets/killed"
    s3_module.fail("killed/shard-000001.json", "503", times=None, method="PUT")
    with pytest.raises(RegionSpotError, match=r"killed/shard-000001.json: upload failed after \d+ tries"):
        _extract(toy_val, url)
    names = Location.parse(url).list()
    assert "shard-000001.tar" in names and "shard-000001.json" not in names and "manifest.json" not in names
    assert "shard-000000.json" in names  # shard 0 was complete before the failure
    s3_module.server.faults.clear()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f"regionspot.tmp-{int(dead.stdout)}-0000abcd-shard-000001"  # as Location.scratch_path names it
    (killed / "shard-000001.tar").parent.mkdir()
    (killed / "shard-000001.tar").write_bytes(b"half a shard")
    live = tmp_path / f"regionspot.tmp-{os.getpid()}-0000abcd-shard-000001"
    live.mkdir()

    puts = s3_module.requests("killed/shard-000000.tar", "PUT")
    assert _extract(toy_val, url) == url
    assert not killed.exists() and live.exists()
    assert s3_module.requests("killed/shard-000000.tar", "PUT") == puts  # a complete shard is not redone
    assert s3_module.requests("killed/shard-000001.tar", "PUT") > 0
    assert _objects(url) == _objects(sets[1])


def test_a_rank_killed_midway_and_restarted_alone_finishes_the_set(sets, s3_module, toy_val, monkeypatch):
    """Rank 1 of 2 dies on its shard's record upload; rank 0 finishes its own shard (no manifest yet); rank 1
    restarted alone redoes its shard and, last to finish, writes the manifest of the one-process set."""
    url = f"{s3_module.url}/sets/ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s3_module.fail("ranks/shard-000001.json", "503", times=None, method="PUT")
    with pytest.raises(RegionSpotError, match=r"ranks/shard-000001.json: upload failed"):
        _extract(toy_val, url)
    s3_module.server.faults.clear()
    monkeypatch.setenv("RANK", "0")
    _extract(toy_val, url)
    assert "manifest.json" not in Location.parse(url).list()  # rank 1's shard is still missing
    monkeypatch.setenv("RANK", "1")
    _extract(toy_val, url)
    assert _objects(url) == _objects(sets[1])


@pytest.mark.slow
def test_two_processes_extract_into_s3_the_set_of_one(sets, s3_module, toy_val):
    """Two ranks (RANK / WORLD_SIZE, as torchrun and srun set them) write one set at a URL together."""
    url = f"{s3_module.url}/sets/two"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "regionspot.cli", *_extract_args(toy_val, url)],
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    if "manifest.json" not in Location.parse(url).list():  # both finished together: either may write it
        assert _extract(toy_val, url) == url
    assert _objects(url) == _objects(sets[1])


# --- train and eval ------------------------------------------------------------------------------------


def _train_cfg(shards, out, **kw):
    from regionspot.train.config import TrainConfig

    base = dict(shards=[shards], out=out, steps=4, batch_size=2, lr=1e-3, warmup_steps=1, lr_drop_steps=[],
                save_every=4, log_every=2, workers=2, shuffle_buffer=4, num_layers=1, num_heads=4, ff_dim=64,
                gpus=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local_run(sets, tmp_path_factory):
    from regionspot.train.trainer import run_train

    return run_train(_train_cfg(sets[0], tmp_path_factory.mktemp("runs") / "local"))


def _weights(run: Path) -> dict:
    from safetensors.numpy import load_file

    step = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
    return load_file(step / "head.safetensors")


def test_train_from_s3_gives_the_weights_of_the_same_run_from_local_disk(sets, local_run, tmp_path):
    from regionspot.train.trainer import run_train

    run = run_train(_train_cfg(sets[1], tmp_path / "s3", storage_options=OPTIONS))  # 2 DataLoader workers
    a, b = _weights(local_run), _weights(run)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    config = (run / "config.yaml").read_text()
    assert sets[1] in config and SECRET not in config and "'***'" in config


def test_eval_from_s3_scores_as_from_local_disk(sets, local_run, toy_val, s3_module, tmp_path):
    from regionspot.evaluate.config import EvalConfig
    from regionspot.evaluate.runner import run_eval

    def evaluate(name, **kw):
        cfg = EvalConfig(checkpoint=local_run / "checkpoints" / "last", dataset="toy_val", data_root=toy_val,
                         backbones="tiny", gpus=0, out=tmp_path / name, evaluator="fast", workers=2, **kw)  # fmt: skip
        return run_eval(cfg, show=False)

    local = evaluate("local", shards=sets[0])
    remote = evaluate("s3", shards=sets[1], storage_options=OPTIONS)
    assert remote.shards_source == "given" and str(remote.shards) == sets[1]
    assert remote.metrics == local.metrics and remote.images == VAL_IMAGES
    assert (tmp_path / "s3" / "detections.json").read_bytes() == (
        tmp_path / "local" / "detections.json"
    ).read_bytes()
    assert SECRET not in (tmp_path / "s3" / "config.yaml").read_text()

    args = ["eval", "--checkpoint", str(local_run / "checkpoints" / "last"), "--dataset", "toy_val", "--data-root",
            str(toy_val), "--backbones", "tiny", "--gpus", "0", "--evaluator", "fast", "--shards-root",
            f"{s3_module.url}/sets", "--storage-options", json.dumps(OPTIONS), "--out", str(tmp_path / "found")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "found" / "metrics.json").read_text())
    assert found["bbox"] == local.metrics["bbox"] and found["info"]["shards"].startswith(
        f"{s3_module.url}/sets/"
    )
    assert SECRET not in result.output


# --- faults --------------------------------------------------------------------------------------------


def test_a_transient_failure_is_retried_during_a_read(sets, s3_module, caplog):
    local, url = sets
    before = s3_module.requests("toy_val/shard-000000.tar", "GET")
    _same_samples(ShardSet(url).iter_samples(), ShardSet(local).iter_samples())
    clean = s3_module.requests("toy_val/shard-000000.tar", "GET") - before  # one ranged read per sample
    before = s3_module.requests("toy_val/shard-000000.tar", "GET")
    s3_module.fail("toy_val/manifest.json", "503", method="GET")
    s3_module.fail("toy_val/shard-000000.tar", "drop", method="GET")  # the connection closes, no answer
    s3_module.fail("toy_val/shard-000001.tar", "truncate", method="GET")  # closes half-way through the body
    _same_samples(ShardSet(url).iter_samples(), ShardSet(local).iter_samples())
    retried = s3_module.requests("toy_val/shard-000000.tar", "GET") - before
    assert retried == clean + 1  # the dropped request's retry
    assert "try 2 of" in caplog.text


def test_a_lasting_failure_stops_training_naming_the_shard(sets, s3_module, tmp_path):
    from regionspot.train.trainer import run_train

    s3_module.fail("toy_val/shard-00000", "503", times=None, method="GET")  # every shard
    try:
        with pytest.raises(
            RegionSpotError, match=r"toy_val/shard-00000\d.(tar|json): read failed after \d+ tries"
        ) as e:
            run_train(_train_cfg(sets[1], tmp_path / "run", workers=0))
    finally:
        s3_module.server.faults.clear()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_verify_streams_a_set_and_catches_a_damaged_object(s3, tmp_path, storage):
    from train_fixtures import World, write_shardset

    world = World()
    samples = world.samples(6, 1)
    local = write_shardset(tmp_path / "set", samples, world.text(), shard_size=3, storage=storage)
    url = write_shardset(f"{s3.url}/set", samples, world.text(), shard_size=3, storage=storage)
    assert _objects(url) == _objects(local)  # a zarr shard uploaded file by file: the same bytes
    _same_samples(ShardSet(url).iter_samples(), samples)
    assert verify_shardset(url) == []

    loc = Location.parse(url)
    shard = f"shard-000001.{'tar' if storage == 'wds' else 'zarr'}"
    damaged = (
        shard
        if storage == "wds"
        else f"{shard}/{max(loc.files(shard), key=lambda f: loc.size(f'{shard}/{f}'))}"
    )
    data = bytearray(loc.read_bytes(damaged))
    data[len(data) // 2] ^= 0x10
    loc.write_bytes_atomic(damaged, bytes(data))
    faults = verify_shardset(url)
    assert len(faults) == 1 and faults[0].startswith(f"{shard}: checksum mismatch")
    if storage == "wds":  # the command prints what verify_shardset finds, whatever the storage
        result = CliRunner().invoke(app, ["shards", "verify", url])
        assert result.exit_code == 1 and f"fault: {shard}: checksum mismatch" in result.output
    with pytest.raises(
        RegionSpotError, match=rf"set/{shard}: .*checksum mismatch.*regionspot shards verify"
    ):
        list(ShardSet(url).iter_samples())  # a reader checks what it fetches, too

    loc.delete(shard)
    assert f"{shard}: missing" in verify_shardset(url)
    with pytest.raises(RegionSpotError, match="1 shard\\(s\\) listed in the manifest are missing"):
        ShardSet(url)


def test_a_missing_protocol_package_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # an import of it raises ImportError
    for args in (
        ["extract", "--out", "s3://bucket/sets/x", "--backbones", "tiny"],
        ["train", "--shards", "s3://bucket/sets/x"],
        ["eval", "--shards", "s3://bucket/sets/x", "--checkpoint", str(tmp_path)],
        ["shards", "verify", "s3://bucket/sets/x"],
        ["shards", "info", "s3://bucket/sets/x"],
    ):
        monkeypatch.setattr(sys, "argv", ["regionspot", *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 1, args
        assert err == (
            'error: s3://bucket/sets/x: s3:// needs s3fs, which is not installed; pip install "regionspot[s3]"\n'
        ), args


def test_storage_options_must_be_a_json_object_and_are_never_echoed(capsys, monkeypatch):
    for text, phrase in (
        (f'{{"secret": "{SECRET}"', "not valid JSON"),
        (f'["{SECRET}"]', "a JSON object is needed"),
    ):
        monkeypatch.setattr(
            sys, "argv", ["regionspot", "shards", "verify", "s3://bucket/x", "--storage-options", text]
        )
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 1 and phrase in err and SECRET not in err and err.count("\n") == 1


def test_a_set_served_over_https_reads_and_verifies(s3):
    """https:// is read-only and may list nothing: moto serves public objects to plain GETs."""
    import boto3
    from train_fixtures import World, write_shardset

    world = World()
    samples = world.samples(7, 2)
    write_shardset(f"{s3.url}/web", samples, world.text(), shard_size=4)
    client = boto3.client("s3", endpoint_url=s3.server.endpoint)
    for name in Location.parse(f"{s3.url}/web").list():
        client.put_object_acl(Bucket=s3.name, Key=f"web/{name}", ACL="public-read")
    url = f"{s3.server.endpoint}/{s3.name}/web"
    shards = ShardSet(url)
    assert shards.location.read_only and shards.num_images == 7
    _same_samples(shards.iter_samples(), samples)
    assert verify_shardset(url) == []
