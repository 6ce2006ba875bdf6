"""`TrainConfig` (every training option, with the paper's values as defaults) and the YAML recipes.

A recipe (regionspot/recipes/NAME.yaml, or any YAML file) sets TrainConfig fields by name; command-line
flags override it; an unknown key is refused before anything runs. The resolved configuration is
written as config.yaml in the run folder and beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from regionspot.errors import RegionSpotError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
_PATHS = ("out", "init")


@dataclass
class TrainConfig:
    shards: list[Path] = field(default_factory=list)
    """Shard sets, or folders holding one shard set per dataset, to mix."""
    out: Path = Path("runs/regionspot")
    """The run folder: checkpoints/, tensorboard/, metrics.jsonl, config.yaml."""
    steps: int = 450_000
    """Optimiser steps (paper: 450K per stage)."""
    batch_size: int = 16
    """Images per step over all ranks (paper: 16); each rank takes batch_size / world of them."""
    lr: float = 2.5e-5
    """AdamW learning rate (paper: 2.5e-5)."""
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    """Clip the gradients' global L2 norm to this (0: off)."""
    warmup_steps: int = 1000
    warmup_factor: float = 0.01
    """The warm-up starts at lr * warmup_factor and rises linearly to lr (detectron2's linear warm-up)."""
    lr_drop_steps: list[int] = field(default_factory=lambda: [350_000, 420_000])
    lr_drop_factor: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mix_weights: list[float] | None = None
    """Sampling weight per dataset, in the order the shard sets are found (default: equal, as the paper)."""
    init: Path | None = None
    """Start from this checkpoint's head weights (stage 2 from stage 1); an official .pth also works."""
    resume: bool = False
    """Continue the run in `out` from its last checkpoint, exactly (weights, optimiser, data, RNG)."""
    gpus: int | None = None
    """GPUs on this machine; more than one starts torchrun (DDP); 0 trains on the CPU."""
    workers: int = 4
    """DataLoader worker processes per rank, each an independent seeded reader (0: read in the main process)."""
    shuffle_buffer: int = 128
    """Images each reader holds (as references; each is read when drawn) and draws from at random, per dataset."""
    prefetch: int = 4
    """Batches each worker prepares ahead."""
    save_every: int = 5000
    log_every: int = 20
    seed: int = 0
    """Seed of the head's initialisation, the data stream and dropout."""
    dropout: float = 0.1
    num_layers: int = 3
    """Decoder layers of the head (paper: 3)."""
    ff_dim: int = 2048
    """Decoder feed-forward width (paper: 2048)."""
    num_heads: int = 8
    shuffle_labels: bool = False
    """A control: every region gets a seeded random label (the quickstart compares against it)."""
    verify_reads: bool = True
    """Check every sample's checksum against its shard's index as it is read (False: for sets already
    checked with `regionspot shards verify`; shapes, dtypes and labels are checked either way)."""

    def check(self) -> TrainConfig:
        """Collect every problem with the values and raise them at once (RegionSpotError)."""
        self.shards = [Path(p) for p in self.shards]
        for name in _PATHS:
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        problems = []
        if not self.shards:
            problems.append("--shards: name at least one shard set (or a folder of shard sets)")
        for flag, value, least in (
            ("steps", self.steps, 1),
            ("batch_size", self.batch_size, 1),
            ("save_every", self.save_every, 1),
            ("log_every", self.log_every, 1),
            ("workers", self.workers, 0),
            ("shuffle_buffer", self.shuffle_buffer, 1),
            ("prefetch", self.prefetch, 1),
            ("warmup_steps", self.warmup_steps, 0),
            ("num_layers", self.num_layers, 1),
            ("ff_dim", self.ff_dim, 1),
            ("num_heads", self.num_heads, 1),
        ):
            if not isinstance(value, int) or value < least:
                problems.append(f"--{flag.replace('_', '-')} {value}: must be an integer >= {least}")
        for flag, value in (("lr", self.lr), ("lr_drop_factor", self.lr_drop_factor)):
            if not value > 0:
                problems.append(f"--{flag.replace('_', '-')} {value}: must be positive")
        if not 0 < self.warmup_factor <= 1:
            problems.append(f"warmup_factor {self.warmup_factor}: must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout {self.dropout}: must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("weight_decay and grad_clip must not be negative")
        if self.mix_weights is not None and (
            not self.mix_weights or min(self.mix_weights) < 0 or sum(self.mix_weights) <= 0
        ):
            problems.append(
                f"mix_weights {self.mix_weights}: give one non-negative weight per dataset, not all 0"
            )
        if self.init is not None and self.resume:
            problems.append("--init with --resume: --resume continues a run, --init starts one; drop one")
        if self.gpus is not None and self.gpus < 0:
            problems.append(f"--gpus {self.gpus}: must be 0 or more")
        if problems:
            raise RegionSpotError("; ".join(problems))
        self.lr_drop_steps = sorted(int(s) for s in self.lr_drop_steps)
        return self

    def to_json(self) -> dict:
        """Plain values (paths as strings) for config.yaml and checkpoints."""
        out = asdict(self)
        out["shards"] = [str(p) for p in self.shards]
        for name in _PATHS:
            out[name] = None if out[name] is None else str(out[name])
        return out


def known_keys() -> list[str]:
    return sorted(f.name for f in fields(TrainConfig))


def load_recipe(recipe: str | Path) -> dict:
    """The values of a recipe: a name under regionspot/recipes/ (bb-stage1, ...) or a YAML file path.

    Raises RegionSpotError for a missing recipe, a file that is not a mapping, or an unknown key.
    """
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise RegionSpotError(
            f"recipe {str(recipe)!r} not found; available: {', '.join(names)}, or a YAML file path"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RegionSpotError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(values, dict):
        raise RegionSpotError(f"{path}: a recipe is a mapping of option: value, got {type(values).__name__}")
    unknown = sorted(set(values) - set(known_keys()))
    if unknown:
        raise RegionSpotError(
            f"{path}: unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(known_keys())}"
        )
    return values


def resolve_config(recipe: str | Path | None = None, **flags) -> TrainConfig:
    """The recipe's values overridden by the flags that are not None, checked."""
    values = load_recipe(recipe) if recipe else {}
    unknown = sorted(set(flags) - set(known_keys()))
    if unknown:
        raise RegionSpotError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known_keys())}")
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**values).check()
