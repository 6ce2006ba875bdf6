"""Training checkpoints: write a step directory, and read one back to resume (DESIGN.md §5).

`runs/NAME/checkpoints/step-NNNNNNN/`:
  head.safetensors   the head (`models.checkpoint.save_head`; metadata: config, fingerprint, step)
  trainer_state.pt   {"step", "optimizer" (AdamW state dict), "positions" (one data position per rank,
                     `TrainStream.position()`), "rng" (per rank: torch CPU RNG state, CUDA RNG state or
                     None), "world"}: tensors, numbers, strings, lists and dicts only, so
                     `torch.load(path, weights_only=True)` reads it
  config.yaml        the resolved TrainConfig
`runs/NAME/checkpoints/last` then names the directory (written last: a crash leaves the previous one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import read_last, save_head, write_last
from regionspot.models.head import RegionSpotHead

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}"


def rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def save_checkpoint(
    run: Path,
    step: int,
    head: RegionSpotHead,
    optimizer: torch.optim.Optimizer,
    positions: list[dict],
    rngs: list[dict],
    config: dict,
    fingerprint: str,
) -> Path:
    """Write `checkpoints/step-NNNNNNN/` (on rank 0) and point `last` at it; returns the directory."""
    directory = step_dir(run, step)
    save_head(head, directory, fingerprint, {"step": step})
    state = {
        "step": step,
        "world": len(positions),
        "optimizer": optimizer.state_dict(),
        "positions": positions,
        "rng": rngs,
    }
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    write_config(directory / CONFIG_FILE, config)
    write_last(directory.parent, directory)
    return directory


def last_checkpoint(run: Path) -> Path | None:
    """The step directory `run/checkpoints/last` names, or None for a new run."""
    return read_last(Path(run) / "checkpoints")


def load_state(directory: Path) -> dict:
    """trainer_state.pt of a step directory, read with weights_only=True."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise RegionSpotError(
            f"{directory} has no {STATE_FILE} (a converted or hand-made checkpoint?); it can start a run with "
            "--init but not be resumed"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegionSpotError(
            f"{path}: unreadable ({type(e).__name__}: {e}); resume from an earlier step"
        ) from e
