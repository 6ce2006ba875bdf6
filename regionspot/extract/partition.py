"""Who extracts what: shards are cut from the key-sorted images; rank r of W takes shards i with i mod W = r."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    rank: int
    world: int
    external: bool  # launched by torchrun / SLURM / several machines, not by this run's --gpus/--workers


def launcher_partition() -> Partition | None:
    """The rank and world size given by the launcher (`RANK`/`WORLD_SIZE`, else SLURM), or None."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            rank, world = int(os.environ[rank_var]), int(os.environ[world_var])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} is outside [0, {world_var}={world})")
            return Partition(rank, world, external=True)
    return None


def num_shards(num_images: int, shard_size: int) -> int:
    return (num_images + shard_size - 1) // shard_size


def shard_range(index: int, shard_size: int, num_images: int) -> range:
    """Positions (in key order) of the images that shard `index` holds."""
    return range(index * shard_size, min((index + 1) * shard_size, num_images))


def shards_of(partition: Partition, total: int) -> list[int]:
    return list(range(partition.rank, total, partition.world))
