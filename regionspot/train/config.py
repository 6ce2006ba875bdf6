"""`TrainConfig` (every training option, with the paper's values as defaults) and the YAML recipes.

A recipe (regionspot/recipes/NAME.yaml, or any YAML file) sets TrainConfig fields by name; command-line
flags override it; an unknown key is refused before anything runs. The resolved configuration is
written as config.yaml in the run folder and beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from regionspot.errors import RegionSpotError
from regionspot.options import check_options, flag_name, option, storage_options_option
from regionspot.shards.location import Location, mask_options, path_or_url

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
_PATHS = ("out", "init")


@dataclass
class TrainConfig:
    shards: list[Path | str] = option(
        default_factory=list, help="A shard set, or a folder of shard sets (one per dataset) to mix: a "
        "directory or a URL (s3://bucket/prefix, gs://..., https://..., file://...); repeatable."
    )  # fmt: skip
    storage_options: dict | None = storage_options_option("--shards URLs'")
    out: Path = option(
        Path("runs/regionspot"), "Run folder: checkpoints/, tensorboard/, metrics.jsonl, config.yaml."
    )
    steps: int = option(450_000, "Optimiser steps (paper: 450K per stage).", min=1)
    batch_size: int = option(
        16, "Images per step over all ranks (paper: 16); each rank takes batch_size / world of them.", min=1
    )
    lr: float = option(2.5e-5, "AdamW learning rate (paper: 2.5e-5).")
    weight_decay: float = option(1e-4, "AdamW weight decay.", flag=False)
    grad_clip: float = option(1.0, "Clip the gradients' global L2 norm to this (0: off).", flag=False)
    warmup_steps: int = option(1000, "Linear warm-up steps (paper: 1000).", min=0)
    warmup_factor: float = option(
        0.01, "The warm-up starts at lr * warmup_factor and rises linearly to lr (detectron2's).", flag=False
    )
    lr_drop_steps: list[int] = option(
        default_factory=lambda: [350_000, 420_000], help="Steps at which lr drops by lr_drop_factor.", flag=False
    )
    lr_drop_factor: float = option(0.1, "What lr is multiplied by at each lr_drop_steps.", flag=False)
    focal_alpha: float = option(0.25, "Sigmoid focal loss alpha.", flag=False)
    focal_gamma: float = option(2.0, "Sigmoid focal loss gamma.", flag=False)
    mix_weights: list[float] | None = option(
        None, "Sampling weight per dataset, in the order the shard sets are found (default: equal, as the "
        "paper).", flag=False,
    )  # fmt: skip
    init: Path | None = option(
        None, "Start from this checkpoint's head (stage 2 from stage 1); an official .pth also works."
    )
    resume: bool = option(
        False, "Continue the run in --out exactly where its last checkpoint left it (weights, optimiser, data, "
        "random state)."
    )  # fmt: skip
    gpus: int | None = option(
        None, "GPUs on this machine: more than 1 starts torchrun (DDP); 0 trains on the CPU (default: one "
        "process, on a GPU when there is one).", min=0,
    )  # fmt: skip
    workers: int = option(
        4, "Processes per GPU that read shards, each an independent seeded reader (0: read in the main "
        "process).", min=0,
    )  # fmt: skip
    shuffle_buffer: int = option(
        128, "Images each reader holds (as references; each is read when drawn) and draws from at random, per dataset.",
        min=1, flag=False,
    )  # fmt: skip
    prefetch: int = option(4, "Batches each reader prepares ahead.", min=1, flag=False)
    save_every: int = option(5000, "Checkpoint every N steps (and at the end).", min=1)
    log_every: int = option(20, "Write metrics.jsonl and TensorBoard every N steps.", min=1)
    seed: int = option(0, "Seed of the head's initialisation, the data stream and dropout.")
    dropout: float = option(0.1, "Dropout in the head's decoder layers.", flag=False)
    num_layers: int = option(3, "Decoder layers of the head (paper: 3).", min=1, flag=False)
    ff_dim: int = option(2048, "Decoder feed-forward width (paper: 2048).", min=1, flag=False)
    num_heads: int = option(8, "Attention heads of the decoder (paper: 8).", min=1, flag=False)
    shuffle_labels: bool = option(
        False, "A control: every region gets a seeded random label (the quickstart compares against it).",
        flag=False,
    )  # fmt: skip
    verify_reads: bool = option(
        True, "Check every sample's checksum against its shard's index as it is read (--no-verify-reads: "
        "for sets already checked with 'regionspot shards verify'; shapes, dtypes and labels are checked "
        "either way)."
    )  # fmt: skip
    max_regions: int | None = option(
        None, "Keep at most N regions of an image, a seeded random subset, to bound memory (default: all, as "
        "the paper).", min=1,
    )  # fmt: skip

    def check(self) -> TrainConfig:
        """Collect every problem with the values and raise them at once (RegionSpotError)."""
        self.shards = [path_or_url(p) for p in self.shards]
        for name in _PATHS:
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        problems = []
        if not self.shards:
            problems.append("--shards: name at least one shard set (or a folder of shard sets)")
        problems += check_options(self)
        for name, fine, rule in (  # float ranges (typer's min= is inclusive and for the flags only)
            ("lr", self.lr > 0, "must be positive"),
            ("lr_drop_factor", self.lr_drop_factor > 0, "must be positive"),
            ("warmup_factor", 0 < self.warmup_factor <= 1, "must be in (0, 1]"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("grad_clip", self.grad_clip >= 0, "must not be negative"),
        ):
            if not fine:
                problems.append(f"{flag_name(self, name)} {getattr(self, name)}: {rule}")
        if self.mix_weights is not None and (
            not self.mix_weights or min(self.mix_weights) < 0 or sum(self.mix_weights) <= 0
        ):
            problems.append(
                f"{flag_name(self, 'mix_weights')} {self.mix_weights}: give one non-negative weight per "
                "dataset, not all 0"
            )
        if self.init is not None and self.resume:
            problems.append("--init with --resume: --resume continues a run, --init starts one; drop one")
        if problems:
            raise RegionSpotError("; ".join(problems))
        for p in self.shards:
            Location.parse(p)  # an unknown protocol or a missing package, before anything runs
        self.lr_drop_steps = sorted(int(s) for s in self.lr_drop_steps)
        return self

    def to_json(self) -> dict:
        """Plain values (paths as strings) for config.yaml and checkpoints."""
        out = asdict(self)
        out["shards"] = [str(p) for p in self.shards]
        for name in _PATHS:
            out[name] = None if out[name] is None else str(out[name])
        out["storage_options"] = mask_options(self.storage_options or {}) or None  # never a secret
        return out


def known_keys() -> list[str]:
    return sorted(f.name for f in fields(TrainConfig))


def list_recipes() -> list[str]:
    """The recipe names `--recipe` accepts (besides a YAML file path)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_recipe(recipe: str | Path) -> dict:
    """The values of a recipe: a name under regionspot/recipes/ (bb-stage1, ...) or a YAML file path.

    Raises RegionSpotError for a missing recipe, a file that is not a mapping, or an unknown key.
    """
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise RegionSpotError(
            f"recipe {str(recipe)!r} not found; available: {', '.join(list_recipes())}, or a YAML file path"
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
