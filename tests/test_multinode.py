"""Training across machines: two torchrun "nodes" on a loopback rendezvous train exactly what one node of
two processes trains (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import World, write_shardset

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, nproc: int, node_rank: int, port: int, train_args: list[str], log: Path):
    """`regionspot train` under torchrun as node `node_rank` of `nnodes`, rendezvous at 127.0.0.1:port."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "regionspot.cli", "train", *train_args,
    ]  # fmt: skip
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the other node
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, f"{log.name}:\n{log.read_text()[-3000:]}"


@pytest.mark.slow
def test_two_nodes_train_the_weights_of_one_node_with_two_processes(tmp_path):
    world = World()
    shards = write_shardset(
        tmp_path / "small", world.samples(40, 1, empty_every=6), world.text(), shard_size=7
    )
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "num_layers: 1\nff_dim: 32\nnum_heads: 4\nwarmup_steps: 1\nlr_drop_steps: []\nshuffle_buffer: 4\n"
    )

    def args(out: str) -> list[str]:
        return [
            "--shards", str(shards), "--recipe", str(recipe), "--out", str(tmp_path / out),
            "--steps", str(STEPS), "--batch-size", "4", "--save-every", "2", "--workers", "1",
            "--gpus", "0",  # gloo on the CPU even where a GPU is visible: both "nodes" would share it
        ]  # fmt: skip

    logs = [tmp_path / "one-node.log"]
    _wait([_torchrun(1, 2, 0, _free_port(), args("one-node"), logs[0])], logs)
    port, logs = _free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    _wait([_torchrun(2, 1, r, port, args("two-nodes"), logs[r]) for r in (0, 1)], logs)

    heads = {
        (run, step): load_file(tmp_path / run / f"checkpoints/step-{step:07d}/head.safetensors")
        for run in ("one-node", "two-nodes")
        for step in (2, STEPS)
    }
    one, two, before = heads["one-node", STEPS], heads["two-nodes", STEPS], heads["one-node", 2]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(before[k], heads["two-nodes", 2][k]) for k in before)
    assert not all(torch.equal(before[k], one[k]) for k in one)  # the steps between moved the weights
    step = f"checkpoints/step-{STEPS:07d}"
    states = [
        torch.load(tmp_path / run / step / "trainer_state.pt", weights_only=True)
        for run in ("one-node", "two-nodes")
    ]
    assert all(s["world"] == 2 and s["step"] == STEPS for s in states)
    assert states[0]["positions"] == states[1]["positions"]  # global rank r read the same images in both
    assert (
        states[1]["positions"][0]["readers"] != states[1]["positions"][1]["readers"]
    )  # the nodes split the data


def test_the_launchers_environment_gives_rank_world_and_device(monkeypatch):
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else srun's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID;
    the GPU is the local rank modulo the GPUs the process sees (checked without a GPU)."""
    from types import SimpleNamespace

    from regionspot.extract.partition import Partition
    from regionspot.extract.runner import _device
    from regionspot.train.distributed import Dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert Dist.from_env() == Dist(0, 1, 0)
    for var, value in (("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1")):
        monkeypatch.setenv(var, value)
    assert Dist.from_env() == Dist(5, 8, 1)  # a task srun started, without torchrun's variables
    for var, value in (("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(var, value)
    assert Dist.from_env() == Dist(2, 4, 3)  # torchrun's win

    joined = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.update(kw))
    Dist(5, 8, 1).init(torch.device("cpu"))
    assert joined == {"rank": 5, "world_size": 8}  # not read from RANK / WORLD_SIZE, which srun leaves unset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert Dist(5, 8, 3).device() == torch.device("cuda", 1)
    plan = SimpleNamespace(cfg=SimpleNamespace(gpus=None))
    assert _device(plan, Partition(2, 4, external=True)) == torch.device("cuda", 1)  # LOCAL_RANK 3
    monkeypatch.delenv("LOCAL_RANK")
    assert _device(plan, Partition(2, 4, external=True)) == torch.device("cuda", 1)  # SLURM_LOCALID 1
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert _device(plan, Partition(2, 4, external=True)) == torch.device("cuda", 0)
    assert _device(plan, Partition(1, 2, external=False)) == torch.device("cuda", 1)  # this run's own worker 1
