"""`regionspot quickstart`: the whole pipeline on a CPU in minutes, with nothing downloaded.

toy data (generated) -> tiny backbones (random, fixed seed) -> extract -> train the head -> eval
on toy_val with GT boxes, next to a control trained the same way on shuffled labels. The backbones
are random, so the numbers check the pipeline (the head learns to fuse where a region is with what
the CLIP map holds there); they say nothing about the paper's accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from regionspot.options import option


@dataclass
class QuickstartConfig:
    out: Path = option(Path("runs/quickstart"), "Output folder: shards, runs, metrics.json, control_metrics.json.")
    data_root: Path | None = option(
        None, "Where the toy dataset is generated (default: $REGIONSPOT_DATASETS, else datasets/)."
    )
    steps: int = option(600, "Training steps for the head and for the control.", min=1)
    batch_size: int = 16
    lr: float = 5e-4
    train_images: int | None = option(None, "Use only the first N toy training images (default: all).", min=1)
    val_images: int | None = option(None, "Evaluate on the first N toy_val images (default: all).", min=1)
    seed: int = 0


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run the pipeline; returns {"model": metrics, "control": metrics} (bbox metrics, 0..1)."""
    from regionspot.data.datasets import resolve_data_root
    from regionspot.evaluate.config import EvalConfig
    from regionspot.evaluate.runner import run_eval
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract
    from regionspot.train.config import TrainConfig
    from regionspot.train.trainer import run_train

    console = Console(stderr=True)
    out = Path(cfg.out)
    data_root = resolve_data_root(cfg.data_root)
    shards = {}
    for dataset, limit in (("toy", cfg.train_images), ("toy_val", cfg.val_images)):
        console.rule(f"extract {dataset} (tiny SAM + tiny CLIP)")
        shards[dataset] = run_extract(ExtractConfig(
            dataset=dataset, data_root=data_root, out=out / "shards" / dataset, backbones="tiny",
            shard_size=100, limit=limit, gpus=0,
        ))
    metrics = {}
    for name, control in (("model", False), ("control", True)):
        console.rule(f"train the head ({'shuffled labels: the control' if control else 'real labels'})")
        run = run_train(TrainConfig(
            shards=[shards["toy"]], out=out / name, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            warmup_steps=min(50, cfg.steps // 10), lr_drop_steps=[], save_every=cfg.steps, seed=cfg.seed,
            shuffle_labels=control, workers=1,
        ))
        console.rule(f"evaluate the {name} on toy_val (GT boxes)")
        result = run_eval(EvalConfig(
            checkpoint=Path(run) / "checkpoints" / "last", proposals="gt", dataset="toy_val", data_root=data_root,
            shards=shards["toy_val"], backbones="tiny", out=out / f"eval-{name}", evaluator="lvis", limit=cfg.val_images,
        ), show=False)
        metrics[name] = result.metrics["bbox"]
    (out / "metrics.json").write_text(json.dumps(metrics["model"], indent=1) + "\n")
    (out / "control_metrics.json").write_text(json.dumps(metrics["control"], indent=1) + "\n")
    print_comparison(metrics)
    return metrics


def print_comparison(metrics: dict) -> None:
    table = Table(title="quickstart: toy_val, GT boxes, tiny random backbones (a pipeline check, not paper numbers)")
    table.add_column("metric")
    table.add_column("trained head", justify="right")
    table.add_column("shuffled-label control", justify="right")
    for name, value in metrics["model"].items():
        control = metrics["control"].get(name)
        table.add_row(name, *("-" if v is None else f"{100 * v:.1f}" for v in (value, control)))
    Console().print(table)
