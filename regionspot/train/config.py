"""`TrainConfig` and the YAML recipes of the paper's runs (regionspot/recipes/*.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from regionspot.errors import RegionSpotError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TrainConfig:
    shards: list[Path] = field(default_factory=list)
    """Shard sets, or folders of shard sets (one per dataset) to mix."""
    out: Path = Path("runs/regionspot")
    steps: int = 450_000
    batch_size: int = 16
    """Images per step over all ranks (paper: 16)."""
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 1000
    lr_drop_steps: list[int] = field(default_factory=lambda: [350_000, 420_000])
    lr_drop_factor: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dropout: float = 0.1
    mix_weights: list[float] | None = None
    """Sampling weight per dataset (default: equal, as the paper)."""
    init: Path | None = None
    """Start from this checkpoint's head weights (stage 2 from stage 1)."""
    resume: bool = False
    gpus: int | None = None
    workers: int = 4
    """Shards read interleaved per dataset and rank (the sample shuffle)."""
    save_every: int = 5000
    log_every: int = 20
    seed: int = 0
    shuffle_labels: bool = False
    """A control: every region gets a seeded random label (the quickstart compares against it)."""

    def check(self) -> TrainConfig:
        problems = []
        if not self.shards:
            problems.append("--shards: name at least one shard set (or a folder of shard sets)")
        for flag, value in (
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--save-every", self.save_every),
            ("--log-every", self.log_every),
            ("--workers", self.workers),
        ):
            if value < 1:
                problems.append(f"{flag} {value}: must be at least 1")
        if self.lr <= 0:
            problems.append(f"--lr {self.lr}: must be positive")
        if self.init is not None and self.resume:
            problems.append("--init and --resume together: --resume continues a run, --init starts one")
        if problems:
            raise RegionSpotError("; ".join(problems))
        return self

    def to_json(self) -> dict:
        return {
            k: ([str(p) for p in v] if k == "shards" else str(v) if isinstance(v, Path) else v)
            for k, v in asdict(self).items()
        }


def load_recipe(recipe: str | Path) -> dict:
    """A recipe's values (a name under regionspot/recipes/ or a YAML path); unknown keys are refused."""
    path = Path(recipe)
    if not path.suffix:
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise RegionSpotError(
            f"recipe {recipe!r} not found; available: {', '.join(names)}, or a YAML file path"
        )
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RegionSpotError(
            f"{path}: unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return values
