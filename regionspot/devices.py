"""Which torch device a process runs on: the one reading of --device (auto, cpu, cuda, cuda:N).

Anything in the package may import this module (it imports only `errors`; torch is imported when a
device is resolved, so checking a name costs nothing).
"""

from __future__ import annotations

import re

from regionspot.errors import RegionSpotError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N."
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """`name` when it is one --device accepts (by its spelling: no torch, no GPU needed).

    Raises: RegionSpotError naming the choices.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegionSpotError(f"--device {name!r}: not a device; use {DEVICE_CHOICES}")
    return name


def resolve_device(name=None, local_rank: int | None = None):
    """The `torch.device` to run on.

    Args:
        name: auto or None (CUDA when present, else the CPU), cpu, cuda, cuda:N, or a torch.device
            (taken as it is).
        local_rank: with auto or cuda, the GPU of this process when one process drives each GPU:
            cuda:(local_rank mod the GPU count).
    Raises:
        RegionSpotError: a name --device does not accept, or a CUDA device this machine lacks.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    name = check_device_name("auto" if name is None else name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RegionSpotError(f"--device {name}: no CUDA device here; use --device cpu")
    count = torch.cuda.device_count()
    if name in ("auto", "cuda"):
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank % count)
    device = torch.device(name)
    if device.index >= count:
        raise RegionSpotError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
