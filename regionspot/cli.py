"""The `regionspot` command line: thin typer commands that check options and call one stage entry point.

Each option is a field of its stage's config (`ExtractConfig`, `TrainConfig`, `EvalConfig`,
`PredictConfig`, `QuickstartConfig`; the backbone flags `models.options.BackboneOptions`, shared by
extract, eval and predict): its name, type, default, help and lower bound are declared there once, and
a command's parameters are that config's fields by name. Choices are `Literal` types, so typer lists
them in --help and refuses a bad value (exit code 2) before any stage code runs. Stage code is imported
inside each command: `regionspot --help` loads no model library.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from regionspot import __version__
from regionspot.data.images import SizeMismatch
from regionspot.devices import DEVICE_CHOICES, check_device_name
from regionspot.errors import RegionSpotError
from regionspot.evaluate.config import EvalConfig, Evaluator, Method
from regionspot.extract.config import ExtractConfig, Storage
from regionspot.models.options import BackboneOptions, Precision, Preset, SamAttention, SamModel, SamTokens
from regionspot.options import field_metadata
from regionspot.predict.config import PredictConfig
from regionspot.quickstart import QuickstartConfig
from regionspot.train.config import TrainConfig, list_recipes


# --- help that says what a value is ---
class _VariadicArgument(TyperArgument):
    """An argument taking many values, named by its metavar (IMAGE...) with no type label."""

    def display_type_rich(self, ctx) -> str | None:
        return None


class _PlainLabels:
    """typer labels every parameter with its Python type; where that says nothing it is left out: a flag
    takes no value (no <bool>), a variadic argument is named by its metavar (no <list[str]>). A
    docstring's paragraphs are rewrapped to the terminal (typer keeps the source's line breaks, so an
    80-column terminal showed every long source line broken in two)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = "\n\n".join(" ".join(p.split()) for p in self.help.split("\n\n"))

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # rich help prints an option's metavar in place of its type
            elif isinstance(param, TyperArgument) and param.nargs != 1:
                param.__class__ = _VariadicArgument
        return params


class _Command(_PlainLabels, TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        """`[OPTIONS] IMAGE...`: arguments by their metavar, without typer's {braces}."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar or param.name.upper())
        return pieces


class _Group(_PlainLabels, TyperGroup):
    pass


app = typer.Typer(
    name="regionspot",
    cls=_Group,
    help="Recognise any region: frozen SAM + frozen CLIP, a small trained fusion head, cached features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
shards_app = typer.Typer(
    cls=_Group, help="Inspect and check shard sets written by 'regionspot extract'.", no_args_is_help=True
)
app.add_typer(shards_app, name="shards")

# --- storage options (a shard set at a URL) ---
STORAGE_OPTIONS_HELP = ("A URL's fsspec filesystem options as a JSON object, e.g. '{\"endpoint_url\": \"http://host:9000\"}'; "
                        "credentials come from the protocol's own variables and files (AWS_*, ~/.aws, gcloud).")


def _storage_options(text: str | None) -> dict | None:
    """--storage-options parsed; its text is never echoed back (it may hold a secret)."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegionSpotError(f"--storage-options: not valid JSON ({e.msg} at character {e.pos}); "
                              "give an object such as '{\"endpoint_url\": \"http://host:9000\"}'") from None
    if not isinstance(options, dict):
        raise RegionSpotError(f"--storage-options: a JSON object is needed, not {type(options).__name__}")
    return options


def _shard_set(where: str, storage_options: str | None):
    from regionspot.shards.location import Location

    return Location.parse(where, _storage_options(storage_options))


StorageOptionsOpt = Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP, metavar="JSON")]


# --- end storage options ---


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"regionspot {__version__}")
        raise typer.Exit()


@app.callback()
def _regionspot(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:  # fmt: skip
    pass


# --- options, from the config fields that declare them ---
def opt(config: type, name: str, *decls: str, **extra: Any) -> Any:
    """The typer option of field `name` of a stage config: its help and lower bound as declared there."""
    meta = field_metadata(config, name)
    return typer.Option(*decls, help=meta["help"], min=meta["min"], **extra)


def _out(config: type) -> Any:
    return opt(config, "out", "--out", "-o")


def _device_name(value: str) -> str:
    try:
        return check_device_name(value)
    except RegionSpotError:
        raise typer.BadParameter(f"{value!r} is not a device; use {DEVICE_CHOICES}") from None


def _device(config: type) -> Any:
    return opt(config, "device", metavar="<auto|cpu|cuda|cuda:N>", callback=_device_name)


# The backbone flags of extract, eval and predict, declared once: the fields of BackboneOptions.
_BACKBONE_TYPES = {
    "backbones": Preset, "sam": SamModel | None, "sam_checkpoint": str | None, "clip": str | None,
    "clip_pretrained": str | None, "clip_size": int | None, "sam_tokens": SamTokens | None,
    "clip_antialias": bool, "precision": Precision | None, "sam_attention": SamAttention, "compile": bool,
}  # fmt: skip
_BACKBONE_PARAMS = [
    inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
        annotation=Annotated[_BACKBONE_TYPES[f.name], opt(BackboneOptions, f.name)],
    )  # fmt: skip
    for f in dataclasses.fields(BackboneOptions)
]


def _with_backbone_options(command):
    """Give `command` the backbone flags in place of its `**backbone` parameter (those it does not declare
    itself): typer reads the signature, the values arrive as keyword arguments (and in ctx.params, which
    the command uses)."""
    signature = inspect.signature(command, eval_str=True)  # the annotations themselves, not their text
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    own = {p.name for p in params}  # a command may declare one itself (predict: --backbones from the checkpoint)
    command.__signature__ = signature.replace(parameters=params + [p for p in _BACKBONE_PARAMS if p.name not in own])
    return command


# --- extract ---
@app.command(cls=_Command)
@_with_backbone_options
def extract(
    ctx: typer.Context,
    dataset: Annotated[str, opt(ExtractConfig, "dataset")] = ExtractConfig.dataset,
    data_root: Annotated[Path | None, opt(ExtractConfig, "data_root")] = None,
    out: Annotated[str | None, _out(ExtractConfig)] = None,
    storage_options: Annotated[str | None, opt(ExtractConfig, "storage_options", metavar="JSON")] = None,
    masks: Annotated[bool, opt(ExtractConfig, "masks")] = ExtractConfig.masks,
    storage: Annotated[Storage, opt(ExtractConfig, "storage")] = ExtractConfig.storage,
    shard_size: Annotated[int, opt(ExtractConfig, "shard_size")] = ExtractConfig.shard_size,
    proposals: Annotated[str, opt(ExtractConfig, "proposals")] = "gt",
    gpus: Annotated[int | None, opt(ExtractConfig, "gpus")] = None,
    workers: Annotated[int | None, opt(ExtractConfig, "workers")] = None,
    batch_size: Annotated[int | None, opt(ExtractConfig, "batch_size")] = None,
    limit: Annotated[int | None, opt(ExtractConfig, "limit")] = None,
    max_boxes: Annotated[int | None, opt(ExtractConfig, "max_boxes")] = None,
    overwrite: Annotated[bool, opt(ExtractConfig, "overwrite")] = ExtractConfig.overwrite,
    allow_outside_root: Annotated[bool, opt(ExtractConfig, "allow_outside_root")] = False,
    size_mismatch: Annotated[SizeMismatch, opt(ExtractConfig, "size_mismatch")] = ExtractConfig.size_mismatch,
    **backbone: Any,
) -> None:
    """Run frozen SAM + CLIP once over a dataset and cache their outputs in shards.

    Resumable: re-running the same command skips finished shards. Launched by torchrun or SLURM,
    each process extracts its rank's shards.
    """
    from regionspot.extract.runner import run_extract

    params = {**ctx.params, "proposals": None if proposals == "gt" else Path(proposals)}
    cfg = ExtractConfig(**{**params, "storage_options": _storage_options(storage_options)})
    path = run_extract(cfg)
    typer.echo(f"shards: {path}\nnext: regionspot shards info {path}   (then: regionspot train --shards {path})")


# --- end extract ---

# --- shards ---
@shards_app.command("info", cls=_Command)
def shards_info(
    directory: Annotated[str, typer.Argument(help="A shard set directory or URL (holds manifest.json).", metavar="DIR", show_default=False)],
    storage_options: StorageOptionsOpt = None,
) -> None:
    """Print what a shard set holds: dataset, storage, shards, images, regions, size, backbones, run."""
    from rich.console import Console
    from rich.table import Table

    from regionspot.shards.verify import shardset_info

    where = _shard_set(directory, storage_options)
    info = shardset_info(where)
    table = Table(title=f"shard set {where}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    Console().print(table)


@shards_app.command("verify", cls=_Command)
def shards_verify(
    directory: Annotated[str, typer.Argument(help="A shard set directory or URL (holds manifest.json), or a folder of shard sets; a URL's shards are streamed, not copied.", metavar="DIR", show_default=False)],
    storage_options: StorageOptionsOpt = None,
) -> None:
    """Check every shard against the manifest: checksums, schema, sample and region counts, missing files.

    Prints "ok: N shards, M images" when sound; otherwise prints each fault and exits with code 1. A
    folder of shard sets (as train --shards takes) has each of its sets verified.
    """
    from regionspot.shards.verify import shard_sets_in

    sets = shard_sets_in(directory)
    if sets:
        typer.echo(f"{directory} is a folder of {len(sets)} shard sets ({', '.join(s.name for s in sets)}): "
                   "verifying each")  # fmt: skip
    faults = sum(
        _verify_shardset(_shard_set(str(s), storage_options), f"{s.name}: " if sets else "") for s in sets or [directory]
    )
    if faults:
        raise typer.Exit(1)


def _verify_shardset(directory, prefix: str) -> int:
    """Verify one shard set, printing its faults (each after `prefix`) or its "ok" line; returns the fault count."""
    from regionspot.progress import progress_bar
    from regionspot.shards.manifest import read_manifest
    from regionspot.shards.verify import verify_shardset

    try:
        total = len(read_manifest(directory)["shards"])
    except (RegionSpotError, KeyError, TypeError):
        total = None  # verify_shardset names the fault
    with progress_bar("verifying shards", "shard", transient=True) as bar:
        task = bar.add_task("verifying shards", total=total)
        faults = verify_shardset(directory, on_shard=lambda name: bar.advance(task))
    if faults:
        for fault in faults:
            typer.echo(f"{prefix}fault: {fault}")
        typer.echo(f"{prefix}{len(faults)} fault(s) in {directory}")
        return len(faults)
    manifest = read_manifest(directory)
    typer.echo(f"{prefix}ok: {len(manifest['shards'])} shards, {manifest['dataset']['images']} images")
    return 0


@shards_app.command("reindex", cls=_Command)
def shards_reindex(
    directory: Annotated[Path, typer.Argument(help="A shard set directory (holds manifest.json).", metavar="DIR", show_default=False)],
) -> None:
    """Bring a shard set of format version 1 or 2 to version 3: its per-sample index, in place.

    Training and evaluation read each sample in one read through the index, and check it. Every shard is
    first checked against the manifest's sha256: a damaged shard is refused, never indexed.
    """
    from regionspot.shards.reindex import reindex_shardset

    manifest = reindex_shardset(directory)
    typer.echo(f"indexed: {len(manifest['shards'])} shards, {manifest['dataset']['images']} images "
               f"(format version {manifest['version']})")


# --- end shards ---

# --- train ---
def _typed(ctx: typer.Context) -> dict:
    """The options typed on the command line (the others leave the recipe's values alone)."""
    return {name: value for name, value in ctx.params.items() if ctx.get_parameter_source(name).name == "COMMANDLINE"}


@app.command(cls=_Command)
def train(
    ctx: typer.Context,
    shards: Annotated[list[str], opt(TrainConfig, "shards", metavar="DIR")],
    recipe: Annotated[str | None, typer.Option(help=f"A recipe ({', '.join(list_recipes())}) or a YAML file of "
                                               "TrainConfig values; the flags given override it.")] = None,
    out: Annotated[Path, _out(TrainConfig)] = TrainConfig.out,
    steps: Annotated[int, opt(TrainConfig, "steps")] = TrainConfig.steps,
    batch_size: Annotated[int, opt(TrainConfig, "batch_size")] = TrainConfig.batch_size,
    lr: Annotated[float, opt(TrainConfig, "lr")] = TrainConfig.lr,
    warmup_steps: Annotated[int, opt(TrainConfig, "warmup_steps")] = TrainConfig.warmup_steps,
    init: Annotated[Path | None, opt(TrainConfig, "init")] = None,
    resume: Annotated[bool, opt(TrainConfig, "resume", "--resume")] = False,
    gpus: Annotated[int | None, opt(TrainConfig, "gpus")] = None,
    workers: Annotated[int, opt(TrainConfig, "workers")] = TrainConfig.workers,
    save_every: Annotated[int, opt(TrainConfig, "save_every")] = TrainConfig.save_every,
    log_every: Annotated[int, opt(TrainConfig, "log_every")] = TrainConfig.log_every,
    seed: Annotated[int, opt(TrainConfig, "seed")] = TrainConfig.seed,
    max_regions: Annotated[int | None, opt(TrainConfig, "max_regions")] = None,
    storage_options: Annotated[str | None, opt(TrainConfig, "storage_options", metavar="JSON")] = None,
    verify_reads: Annotated[bool, opt(TrainConfig, "verify_reads")] = TrainConfig.verify_reads,
) -> None:  # fmt: skip
    """Train the fusion head from cached features (no backbone in the loop).

    The defaults shown are TrainConfig's (the paper's values); a --recipe sets its own, and the flags
    given override both. Writes runs/NAME/checkpoints/step-N (head.safetensors, trainer_state.pt,
    config.yaml) and checkpoints/last, TensorBoard events, metrics.jsonl and config.yaml.
    """
    from regionspot.train.config import resolve_config
    from regionspot.train.distributed import launched_by_torchrun, torchrun

    given = _typed(ctx)
    given.pop("recipe", None)
    if "storage_options" in given:
        given["storage_options"] = _storage_options(storage_options)
    cfg = resolve_config(recipe, **given)
    if (cfg.gpus or 0) > 1 and not launched_by_torchrun():
        raise typer.Exit(torchrun(cfg.gpus, sys.argv[1:]))
    from regionspot.train.trainer import run_train

    run = run_train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run: {run}  (checkpoint: {run / 'checkpoints' / 'last'})")


@app.command("convert-official", cls=_Command)
def convert_official(
    checkpoint: Annotated[Path, typer.Argument(help="An official RegionSpot .pth (regionspot_bb.pth, regionspot_bl.pth).",
                                               metavar="CHECKPOINT", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write (holds head.safetensors).")],
) -> None:  # fmt: skip
    """Convert a checkpoint released with the paper into a regionspot checkpoint directory.

    Only the head's weights are read (weights_only); it takes the backbones fingerprint of whatever
    command later loads it (--backbones), as the .pth itself would.
    """
    from regionspot.models.checkpoint import convert_official as convert

    path = convert(checkpoint, out)
    typer.echo(f"wrote {path / 'head.safetensors'}")


# --- end train ---

# --- eval ---
@app.command("eval", cls=_Command)
@_with_backbone_options
def eval_(
    ctx: typer.Context,
    checkpoint: Annotated[Path | None, opt(EvalConfig, "checkpoint")] = None,
    proposals: Annotated[str, opt(EvalConfig, "proposals")] = EvalConfig.proposals,
    dataset: Annotated[str, opt(EvalConfig, "dataset")] = EvalConfig.dataset,
    data_root: Annotated[Path | None, opt(EvalConfig, "data_root")] = None,
    shards: Annotated[str | None, opt(EvalConfig, "shards")] = None,
    shards_root: Annotated[str | None, opt(EvalConfig, "shards_root")] = None,
    storage_options: Annotated[str | None, opt(EvalConfig, "storage_options", metavar="JSON")] = None,
    method: Annotated[Method, opt(EvalConfig, "method")] = EvalConfig.method,
    max_dets: Annotated[int, opt(EvalConfig, "max_dets")] = EvalConfig.max_dets,
    candidates: Annotated[int, opt(EvalConfig, "candidates")] = EvalConfig.candidates,
    masks: Annotated[bool, opt(EvalConfig, "masks")] = EvalConfig.masks,
    evaluator: Annotated[Evaluator, opt(EvalConfig, "evaluator")] = EvalConfig.evaluator,
    out: Annotated[Path | None, _out(EvalConfig)] = None,
    batch_size: Annotated[int, opt(EvalConfig, "batch_size")] = EvalConfig.batch_size,
    device: Annotated[str, _device(EvalConfig)] = EvalConfig.device,
    workers: Annotated[int, opt(EvalConfig, "workers")] = EvalConfig.workers,
    gpus: Annotated[int | None, opt(EvalConfig, "gpus")] = None,
    limit: Annotated[int | None, opt(EvalConfig, "limit")] = None,
    allow_outside_root: Annotated[bool, opt(EvalConfig, "allow_outside_root")] = False,
    **backbone: Any,
) -> None:
    """Evaluate a checkpoint on LVIS / COCO with GT boxes or a detector's proposals (paper Table 1).

    Features come from cached shards (found or extracted once), so a new checkpoint costs only the
    head. Writes detections.json, metrics.json and config.yaml to --out and prints the AP table.
    """
    from regionspot.evaluate.runner import run_eval
    from regionspot.models.presets import backbones_for_checkpoint

    params = {**ctx.params, "storage_options": _storage_options(storage_options)}
    typed = ctx.get_parameter_source("backbones").name == "COMMANDLINE"
    if params["method"] == "regionspot":  # no --backbones: the checkpoint's preset, where its fingerprint names one
        found = backbones_for_checkpoint(params["backbones"] if typed else None, params["checkpoint"])
        params["backbones"] = found.get("backbones", params["backbones"])
        if params["sam_tokens"] is None:
            params["sam_tokens"] = found.get("sam_tokens")
    run_eval(EvalConfig(**params))


# --- end eval ---

# --- predict ---
@app.command(cls=_Command)
@_with_backbone_options
def predict(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(help=field_metadata(PredictConfig, "images")["help"],
                                                metavar="IMAGE...", show_default=False)],
    vocab: Annotated[str | None, opt(PredictConfig, "vocab")] = None,
    vocab_file: Annotated[Path | None, opt(PredictConfig, "vocab_file")] = None,
    boxes: Annotated[str | None, opt(PredictConfig, "boxes")] = None,
    boxes_file: Annotated[Path | None, opt(PredictConfig, "boxes_file")] = None,
    points: Annotated[str | None, opt(PredictConfig, "points")] = None,
    checkpoint: Annotated[Path | None, opt(PredictConfig, "checkpoint")] = None,
    backbones: Annotated[Preset | None, opt(PredictConfig, "backbones")] = None,
    masks: Annotated[bool, opt(PredictConfig, "masks")] = PredictConfig.masks,
    attention: Annotated[bool, opt(PredictConfig, "attention")] = PredictConfig.attention,
    embeddings: Annotated[bool, opt(PredictConfig, "embeddings")] = PredictConfig.embeddings,
    points_per_side: Annotated[int | None, opt(PredictConfig, "points_per_side")] = None,
    pred_iou_thresh: Annotated[float | None, opt(PredictConfig, "pred_iou_thresh")] = None,
    stability_score_thresh: Annotated[float | None, opt(PredictConfig, "stability_score_thresh")] = None,
    min_area: Annotated[int, opt(PredictConfig, "min_area")] = PredictConfig.min_area,
    topk: Annotated[int, opt(PredictConfig, "topk")] = PredictConfig.topk,
    out: Annotated[Path, _out(PredictConfig)] = PredictConfig.out,
    batch_size: Annotated[int, opt(PredictConfig, "batch_size")] = PredictConfig.batch_size,
    max_boxes: Annotated[int | None, opt(PredictConfig, "max_boxes")] = None,
    device: Annotated[str, _device(PredictConfig)] = PredictConfig.device,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    **backbone: Any,
) -> None:  # fmt: skip
    """Name regions of your own images: boxes, clicks or SAM's automatic regions, any vocabulary.

    Writes OUT/<stem>.regionspot.json (regions in prompt order: box, label, score, top-k, SAM IoU, mask)
    and OUT/<stem>.regionspot.png (masks, boxes, clicks and "label score" drawn on the image); an
    output never takes an input's name.
    """
    from regionspot.predict.runner import run_predict

    params = {name: value for name, value in ctx.params.items() if name != "progress"}
    run_predict(PredictConfig(**params), show_progress=progress)


# --- end predict ---

# --- quickstart ---
@app.command(cls=_Command)
def quickstart(
    ctx: typer.Context,
    out: Annotated[Path, _out(QuickstartConfig)] = QuickstartConfig.out,
    data_root: Annotated[Path | None, opt(QuickstartConfig, "data_root")] = None,
    steps: Annotated[int, opt(QuickstartConfig, "steps")] = QuickstartConfig.steps,
    train_images: Annotated[int | None, opt(QuickstartConfig, "train_images")] = None,
    val_images: Annotated[int | None, opt(QuickstartConfig, "val_images")] = None,
) -> None:
    """The whole pipeline on a CPU in minutes: toy data, tiny random backbones, extract -> train -> eval,
    next to a control trained on shuffled labels. A pipeline check, not the paper's accuracy."""
    from regionspot.quickstart import run_quickstart

    run_quickstart(QuickstartConfig(**ctx.params))


# --- end quickstart ---


def main() -> None:
    """Console entry point: project errors become one line on stderr and exit code 1."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # outside standalone mode click returns typer.Exit's code
            sys.exit(code)
    except RegionSpotError as e:
        if os.environ.get("REGIONSPOT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own formatting
        # typer >= 0.26 vendors click (typer._click), so its usage errors are not click.ClickException
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
