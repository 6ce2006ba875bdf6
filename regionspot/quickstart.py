"""`regionspot quickstart`: the whole pipeline on a CPU in minutes, with nothing downloaded.

toy data (generated) -> tiny backbones (random, fixed seed) -> extract -> train the head -> eval
on toy_val with GT boxes, next to a control trained the same way on shuffled labels. The backbones
are random, so the numbers check the pipeline (the head learns to fuse where a region is with what
the CLIP map holds there); they say nothing about the paper's accuracy.

Run again into the same --out, it reuses what the same settings made: the shard sets (extraction
skips finished shards) and each finished training run (an interrupted one resumes); a shard set or
run of other settings (--train-images, --steps, other tiny backbones after an update, ...) is made
again from scratch. The evaluations always run again (seconds).
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from regionspot.errors import RegionSpotError
from regionspot.options import option


@dataclass
class QuickstartConfig:
    out: Path = option(
        Path("runs/quickstart"), "Output folder: shards, runs, metrics.json, control_metrics.json. A second "
        "run reuses what the same settings made there."
    )  # fmt: skip
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
    from regionspot.shards.shardset import ShardSet
    from regionspot.train.config import TrainConfig
    from regionspot.train.trainer import run_train

    console = Console(stderr=True)

    def say(message: str) -> None:  # one line however long its paths: no wrapping, no markup
        console.print(message, soft_wrap=True, markup=False, highlight=False)

    out = Path(cfg.out)
    data_root = resolve_data_root(cfg.data_root)
    seconds: dict[str, float] = {}
    shards, remade = {}, {}
    for dataset, limit in (("toy", cfg.train_images), ("toy_val", cfg.val_images)):
        console.rule(f"extract {dataset} (tiny SAM + tiny CLIP)")
        started = time.perf_counter()
        extract = ExtractConfig(
            dataset=dataset, data_root=data_root, out=out / "shards" / dataset, backbones="tiny",
            shard_size=100, limit=limit, gpus=0,
        )  # fmt: skip
        differences = _shards_differ(extract)
        if differences:
            say(f"{extract.out} holds shards of other settings ({differences[0]}): extracting again")
        extract.overwrite = remade[dataset] = bool(differences)
        shards[dataset] = run_extract(extract)
        seconds[f"extract {dataset}"] = time.perf_counter() - started
    fingerprint = ShardSet(shards["toy"]).fingerprint
    metrics = {}
    for name, control in (("model", False), ("control", True)):
        console.rule(f"train the head ({'shuffled labels: the control' if control else 'real labels'})")
        started = time.perf_counter()
        train = TrainConfig(
            shards=[shards["toy"]], out=out / name, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            warmup_steps=min(50, cfg.steps // 10), lr_drop_steps=[], save_every=cfg.steps, seed=cfg.seed,
            shuffle_labels=control, workers=1,
        )  # fmt: skip
        previous = _previous_run(train, fingerprint)
        if remade["toy"] and previous != "new":  # trained on the shards just replaced
            previous = "other"
        if previous == "finished":
            say(f"{train.out} holds this run, finished: reusing it")
        else:
            if previous == "other":
                say(f"{train.out} holds a run of other settings: training again from the start")
                shutil.rmtree(train.out)
            train.resume = previous == "unfinished"
            run_train(train)
        seconds[f"train {name}"] = time.perf_counter() - started
        console.rule(f"evaluate the {name} on toy_val (GT boxes)")
        started = time.perf_counter()
        result = run_eval(EvalConfig(
            checkpoint=Path(train.out) / "checkpoints" / "last", proposals="gt", dataset="toy_val",
            data_root=data_root, shards=shards["toy_val"], backbones="tiny", out=out / f"eval-{name}",
            evaluator="lvis", limit=cfg.val_images,
        ), show=False)  # fmt: skip
        seconds[f"eval {name}"] = time.perf_counter() - started
        metrics[name] = result.metrics["bbox"]
    (out / "metrics.json").write_text(json.dumps(metrics["model"], indent=1, allow_nan=False) + "\n")
    (out / "control_metrics.json").write_text(json.dumps(metrics["control"], indent=1, allow_nan=False) + "\n")
    print_comparison(metrics)
    print_next_steps(out, shards, data_root, seconds)
    return metrics


def _shards_differ(extract) -> list[str]:
    """How the shard set already at `extract.out` differs from what `extract` would write ([] when it
    is the same run, or when there is none yet)."""
    from regionspot.extract.runner import identity, make_plan
    from regionspot.models.presets import load_backbones
    from regionspot.shards.identity import IDENTITY, identity_differences, read_identity

    file = Path(extract.out) / IDENTITY
    if not file.exists():
        return []
    stored = read_identity(extract.out)
    if stored is None:
        return [f"{file} is not valid JSON"]
    plan = make_plan(extract)
    wanted = json.loads(json.dumps(identity(plan, load_backbones(plan.spec).info())))  # as stored: lists
    return identity_differences(wanted, stored, str(file))


def _previous_run(train, fingerprint: str) -> str:
    """What `train.out` holds: "new" (no checkpoint), "finished" or "unfinished" (a run of these settings
    on shards of this fingerprint), or "other" (a quickstart run of other settings).

    Raises RegionSpotError when it holds a run the quickstart did not make (other shards).
    """
    import yaml

    from regionspot.train.state import CONFIG_FILE, last_checkpoint, step_dir

    run = Path(train.out)
    last = last_checkpoint(run)
    if last is None:
        return "new"
    wanted = train.to_json()
    try:
        stored = yaml.safe_load((run / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        stored = {}
    if stored.get("shards") != wanted["shards"]:
        raise RegionSpotError(
            f"{run} holds a training run the quickstart did not make (its shards are not {wanted['shards'][0]}); "
            "pass another --out"
        )
    same = stored.get("fingerprint") == fingerprint and all(
        stored.get(k) == v for k, v in wanted.items() if k != "resume"
    )
    if not same:
        return "other"
    return "finished" if last.resolve() == step_dir(run, train.steps).resolve() else "unfinished"


def print_comparison(metrics: dict) -> None:
    table = Table(title="quickstart: toy_val, GT boxes, tiny random backbones (a pipeline check, not paper numbers)")
    table.add_column("metric")
    table.add_column("trained head", justify="right")
    table.add_column("shuffled-label control", justify="right")
    for name, value in metrics["model"].items():
        control = metrics["control"].get(name)
        table.add_row(name, *("-" if v is None else f"{100 * v:.1f}" for v in (value, control)))
    Console().print(table)


def predict_command(out: Path, data_root: Path) -> str:
    """The `regionspot predict` line that names the regions of the first toy_val image (its annotated
    boxes) with the trained head: one line, to paste into a shell."""
    from regionspot.data.datasets import open_dataset

    reader = open_dataset("toy_val", data_root)
    record = reader.records()[0]
    boxes = ";".join(",".join(f"{v:g}" for v in box) for box in record.boxes.round().tolist())
    vocab = ",".join(c.name for c in reader.vocabulary)
    args = ["regionspot", "predict", str(record.path), "--vocab", vocab, "--boxes", boxes, "--backbones", "tiny",
            "--checkpoint", str(Path(out) / "model" / "checkpoints" / "last"), "--out", str(Path(out) / "predict")]  # fmt: skip
    return shlex.join(args)


def print_next_steps(out: Path, shards: dict, data_root: Path, seconds: dict[str, float]) -> None:
    """Where the results are, the time each stage took, and a predict line to try next (plain print:
    the lines are meant to be copied, so they are never wrapped)."""
    from regionspot.models.checkpoint import read_last

    out = Path(out)
    last = read_last(out / "model" / "checkpoints")
    lines = [
        f"checkpoint: {out / 'model' / 'checkpoints' / 'last'} ({last.name if last else 'none'}); "
        f"control: {out / 'control' / 'checkpoints' / 'last'}",
        f"metrics:    {out / 'metrics.json'}, {out / 'control_metrics.json'} "
        f"(detections in {out / 'eval-model'}, {out / 'eval-control'})",
        f"shards:     {shards['toy']}, {shards['toy_val']} (regionspot shards info DIR)",
        "time:       " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items())
        + f"; {sum(seconds.values()) / 60:.1f} min in all",
        "next: name the regions of a toy image with the trained head (without --boxes, SAM's automatic",
        "      regions; the random tiny SAM finds few). The pictures go to "
        f"{out / 'predict'}:",
        predict_command(out, data_root),
    ]
    print("\n".join(lines), flush=True)
