"""Data-parallel training: who this process is, and `--gpus N` as a torchrun launch on one machine.

Under torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each process
trains on its share of the global batch and DDP averages the gradients; NCCL on GPUs, gloo on CPUs.
A task started by SLURM's srun without them is ranked by SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
(MASTER_ADDR/PORT still come from the environment). Several machines: run `torchrun --nnodes ... -m
regionspot.cli train ...` yourself, or scripts/slurm/train.sbatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Who this process is: torchrun's RANK, WORLD_SIZE, LOCAL_RANK; when RANK is unset, SLURM's
        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (a task started by srun); else one process."""
        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env:
            return cls(int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0)))
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK, modulo the GPUs this process sees (a launcher may show each task only its
        own); the CPU without CUDA."""
        if torch.cuda.is_available():
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def init(self, device: torch.device) -> None:
        """Join the process group (once), when there is more than one rank."""
        if self.world > 1 and not dist.is_initialized():
            # rank and world given, not read from RANK / WORLD_SIZE: they may come from SLURM's variables
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", rank=self.rank, world_size=self.world
            )

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` holds on every rank (so all ranks stop together, none waits forever)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (on the device: no host sync)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (plain picklable data)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run `regionspot <argv>` in `nproc` processes on this machine under torchrun; its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "regionspot.cli",
        *argv,
    ]
    return subprocess.call(cmd)
