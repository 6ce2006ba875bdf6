"""The `regionspot` command line: thin typer commands that check options and call one stage entry point.

Heavy imports happen inside each command, so `regionspot --help` is instant and a stage never
loads another stage's dependencies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from regionspot.errors import RegionSpotError

app = typer.Typer(
    name="regionspot",
    help="Recognise any region: frozen SAM + frozen CLIP, a small trained fusion head, cached features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
shards_app = typer.Typer(help="Inspect and check shard sets written by 'regionspot extract'.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


# --- extract ---
@app.command()
def extract(
    dataset: Annotated[str, typer.Option(help="Dataset name (o365, v3det, openimages, lvis_val, coco, toy, toy_val), "
                                         "coco:ANN.json:IMAGES or openimages:BOXES.csv:CLASSES.csv:IMAGES.")] = "toy",
    data_root: Annotated[Path | None, typer.Option(help="Root of the named datasets (default: $REGIONSPOT_DATASETS, else datasets/).")] = None,
    out: Annotated[Path | None, typer.Option(help="Shard set directory (default: shards/DATASET).")] = None,
    backbones: Annotated[str, typer.Option(help="Backbone preset: bb, bl, bl336 or tiny.")] = "bl",
    sam: Annotated[str | None, typer.Option(help="SAM variant: vit_b, vit_l, vit_h (overrides the preset).")] = None,
    sam_checkpoint: Annotated[str | None, typer.Option(help="SAM weights file, e.g. sam_vit_b_01ec64.pth.")] = None,
    clip: Annotated[str | None, typer.Option(help="open_clip model name, e.g. ViT-L-14-quickgelu.")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag (openai) or a weights file.")] = None,
    clip_size: Annotated[int | None, typer.Option(help="CLIP input size S (the image is resized to S x S).")] = None,
    sam_tokens: Annotated[int | None, typer.Option(help="1: the single-mask token (paper); 3: the multimask tokens.")] = None,
    masks: Annotated[bool, typer.Option(help="Also store SAM's mask per region (COCO RLE).")] = False,
    storage: Annotated[str, typer.Option(help="Shard storage: wds (tar) or zarr.")] = "wds",
    shard_size: Annotated[int, typer.Option(help="Images per shard: the unit of resume and distribution.")] = 1000,
    proposals: Annotated[str | None, typer.Option(help="'gt' (annotations) or a detector's boxes: COCO results JSON or the official RegionSpot dict.")] = "gt",
    gpus: Annotated[int | None, typer.Option(help="Processes, one per GPU (default: all visible; 0 = CPU).")] = None,
    workers: Annotated[int | None, typer.Option(help="GPU: decoding workers per GPU (8). CPU: extraction processes (1).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Extract only the first N images (by key).")] = None,
    max_boxes: Annotated[int | None, typer.Option(help="Keep an image's N best proposals (annotations: the N largest).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace shards of a different run in --out.")] = False,
) -> None:
    """Run frozen SAM + CLIP once over a dataset and cache their outputs in shards.

    Resumable: re-running the same command skips finished shards. Launched by torchrun or SLURM,
    each process extracts its rank's shards.
    """
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract

    cfg = ExtractConfig(
        dataset=dataset, data_root=data_root, out=out, backbones=backbones, sam=sam, sam_checkpoint=sam_checkpoint,
        clip=clip, clip_pretrained=clip_pretrained, clip_size=clip_size, sam_tokens=sam_tokens, masks=masks,
        storage=storage, shard_size=shard_size, proposals=None if proposals in (None, "gt") else Path(proposals),
        gpus=gpus, workers=workers, batch_size=batch_size, limit=limit, max_boxes=max_boxes, overwrite=overwrite,
    )
    path = run_extract(cfg)
    typer.echo(f"shards: {path}")


# --- end extract ---

# --- shards ---
@shards_app.command("info")
def shards_info(
    directory: Annotated[Path, typer.Argument(help="A shard set directory (holds manifest.json).", metavar="DIR", show_default=False)],
) -> None:
    """Print what a shard set holds: dataset, storage, shards, images, regions, size, backbones, run."""
    from rich.console import Console
    from rich.table import Table

    from regionspot.shards.verify import shardset_info

    info = shardset_info(directory)
    table = Table(title=f"shard set {directory}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    Console().print(table)


@shards_app.command("verify")
def shards_verify(
    directory: Annotated[Path, typer.Argument(help="A shard set directory (holds manifest.json).", metavar="DIR", show_default=False)],
) -> None:
    """Check every shard against the manifest: checksums, schema, sample and region counts, missing files.

    Prints "ok: N shards, M images" when sound; otherwise prints each fault and exits with code 1.
    """
    from rich.console import Console
    from rich.progress import Progress

    from regionspot.shards.manifest import read_manifest
    from regionspot.shards.verify import verify_shardset

    err = Console(stderr=True)
    try:
        total = len(read_manifest(directory)["shards"])
    except (RegionSpotError, KeyError, TypeError):
        total = None  # verify_shardset names the fault
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("verifying shards", total=total)
        faults = verify_shardset(directory, on_shard=lambda name: bar.advance(task))
    if faults:
        for fault in faults:
            typer.echo(f"fault: {fault}")
        typer.echo(f"{len(faults)} fault(s) in {directory}")
        raise typer.Exit(1)
    manifest = read_manifest(directory)
    typer.echo(f"ok: {len(manifest['shards'])} shards, {manifest['dataset']['images']} images")


@shards_app.command("reindex")
def shards_reindex(
    directory: Annotated[Path, typer.Argument(help="A shard set directory (holds manifest.json).", metavar="DIR", show_default=False)],
) -> None:
    """Write the per-sample index into a shard set's records, in place (format version 1 -> 2).

    Training and evaluation read a sample in one read through the index and check it. Each shard is first
    checked against the manifest's sha256: a damaged shard is refused, never indexed.
    """
    from regionspot.shards.reindex import reindex_shardset

    manifest = reindex_shardset(directory)
    typer.echo(f"indexed: {len(manifest['shards'])} shards, {manifest['dataset']['images']} images "
               f"(format version {manifest['version']})")


# --- end shards ---

# --- train ---
@app.command()
def train(
    shards: Annotated[list[Path], typer.Option(help="A shard set, or a folder of shard sets (one per dataset) to mix; repeatable.")],
    recipe: Annotated[str | None, typer.Option(help="A recipe (bb-stage1, bb-stage2, bl-stage1, bl-stage2) or a YAML file of TrainConfig values; flags override it.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/regionspot).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (paper: 450000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step over all ranks (paper: 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (paper: 2.5e-5).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (paper: 1000).")] = None,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint's head (stage 2 from stage 1; an official .pth works).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where its last checkpoint left it.")] = False,
    gpus: Annotated[int | None, typer.Option(help="GPUs on this machine; more than 1 starts torchrun (DDP).")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes per GPU, each a seeded reader (0: read in the main process).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (and at the end).")] = None,
    log_every: Annotated[int | None, typer.Option(help="Write metrics.jsonl / TensorBoard every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the head's initialisation, the data stream and dropout.")] = None,
    verify_reads: Annotated[bool | None, typer.Option("--verify-reads/--no-verify-reads", help="Check each sample's checksum as it is read (default); --no-verify-reads for sets already checked with 'regionspot shards verify'.")] = None,
) -> None:
    """Train the fusion head from cached features (no backbone in the loop).

    Writes runs/NAME/checkpoints/step-N (head.safetensors, trainer_state.pt, config.yaml) and
    checkpoints/last, TensorBoard events, metrics.jsonl and config.yaml.
    """
    from regionspot.train.config import resolve_config
    from regionspot.train.distributed import launched_by_torchrun, torchrun

    cfg = resolve_config(recipe, shards=shards, out=out, steps=steps, batch_size=batch_size, lr=lr,
                         warmup_steps=warmup_steps, init=init, resume=resume or None, gpus=gpus, workers=workers,
                         save_every=save_every, log_every=log_every, seed=seed, verify_reads=verify_reads)
    if (cfg.gpus or 0) > 1 and not launched_by_torchrun():
        raise typer.Exit(torchrun(cfg.gpus, sys.argv[1:]))
    from regionspot.train.trainer import run_train

    run = run_train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run: {run}  (checkpoint: {run / 'checkpoints' / 'last'})")


@app.command("convert-official")
def convert_official(
    checkpoint: Annotated[Path, typer.Argument(help="An official RegionSpot .pth (regionspot_bb.pth, regionspot_bl.pth).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write (holds head.safetensors).")],
) -> None:
    """Convert a checkpoint released with the paper into a regionspot checkpoint directory.

    Only the head's weights are read (weights_only); it takes the backbones fingerprint of whatever
    command later loads it (--backbones), as the .pth itself would.
    """
    from regionspot.models.checkpoint import convert_official as convert

    path = convert(checkpoint, output)
    typer.echo(f"wrote {path / 'head.safetensors'}")


# --- end train ---

# --- eval ---
@app.command("eval")
def eval_(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint dir (runs/NAME/checkpoints/last), head.safetensors or an official .pth.")] = None,
    proposals: Annotated[str, typer.Option(help="'gt' (annotated boxes, score 1) or a detector's boxes: COCO results JSON or the official dict.")] = "gt",
    dataset: Annotated[str, typer.Option(help="lvis_val, coco, toy_val, ... or coco:ANN.json:IMAGES (COCO/LVIS annotations).")] = "lvis_val",
    data_root: Annotated[Path | None, typer.Option(help="Root of the named datasets (default: $REGIONSPOT_DATASETS, else datasets/).")] = None,
    shards: Annotated[Path | None, typer.Option(help="Shard set to read (default: find one under --shards-root, else extract one there).")] = None,
    shards_root: Annotated[Path | None, typer.Option(help="Where shard sets are found and made (default: $REGIONSPOT_SHARDS, else shards/).")] = None,
    backbones: Annotated[str, typer.Option(help="Backbone preset (bb, bl, bl336, tiny): for official .pth files, baselines and extraction.")] = "bl",
    sam: Annotated[str | None, typer.Option(help="SAM variant (overrides the preset).")] = None,
    sam_checkpoint: Annotated[str | None, typer.Option(help="SAM weights file.")] = None,
    clip: Annotated[str | None, typer.Option(help="open_clip model name.")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag or weights file.")] = None,
    clip_size: Annotated[int | None, typer.Option(help="CLIP input size S.")] = None,
    sam_tokens: Annotated[int | None, typer.Option(help="1: single-mask token (paper); 3: multimask tokens.")] = None,
    method: Annotated[str, typer.Option(help="regionspot (the head), clip-crop or clip-mask (the paper's CLIP baselines).")] = "regionspot",
    max_dets: Annotated[int, typer.Option(help="Detections kept per image, by score (LVIS: 300).")] = 300,
    candidates: Annotated[int, typer.Option(help="(region, class) pairs kept per image by probability before scoring.")] = 900,
    masks: Annotated[bool, typer.Option(help="Also write SAM masks as segmentations and report segm metrics.")] = False,
    evaluator: Annotated[str, typer.Option(help="lvis (reference lvis / pycocotools APIs) or fast (vectorised, same numbers).")] = "lvis",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/NAME/eval/STEP-DATASET-PROPOSALS beside the checkpoint).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per head forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Shard-reading worker processes.")] = 0,
    gpus: Annotated[int | None, typer.Option(help="Extraction on the spot: processes, one per GPU (0 = CPU).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only (the ground truth is cut to them).")] = None,
) -> None:
    """Evaluate a checkpoint on LVIS / COCO with GT boxes or a detector's proposals (paper Table 1).

    Features come from cached shards (found or extracted once), so a new checkpoint costs only the
    head. Writes detections.json, metrics.json and config.yaml to --out and prints the AP table.
    """
    from regionspot.evaluate.config import EvalConfig
    from regionspot.evaluate.runner import run_eval

    cfg = EvalConfig(
        checkpoint=checkpoint, proposals=proposals, dataset=dataset, data_root=data_root, shards=shards,
        shards_root=shards_root, backbones=backbones, sam=sam, sam_checkpoint=sam_checkpoint, clip=clip,
        clip_pretrained=clip_pretrained, clip_size=clip_size, sam_tokens=sam_tokens, method=method,
        max_dets=max_dets, candidates=candidates, masks=masks, evaluator=evaluator, out=out,
        batch_size=batch_size, device=device, workers=workers, gpus=gpus, limit=limit,
    )
    run_eval(cfg)


# --- end eval ---

# --- predict ---
@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.", show_default=False)],
    vocab: Annotated[str | None, typer.Option(help='Class names, comma-separated: "cat,dog,sofa".')] = None,
    vocab_file: Annotated[Path | None, typer.Option(help="A file with one class name per line.")] = None,
    boxes: Annotated[str | None, typer.Option(help='Boxes for every image: "x0,y0,x1,y1;x0,y0,x1,y1" (pixels).')] = None,
    boxes_file: Annotated[Path | None, typer.Option(help="Boxes per image: a COCO results list or the official RegionSpot dict; image_id = the file stem.")] = None,
    points: Annotated[str | None, typer.Option(help='Clicks for every image: "x,y;x,y" (one region each). No boxes or points: SAM finds the regions.')] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory, head.safetensors or official RegionSpot .pth.")] = None,
    backbones: Annotated[str, typer.Option(help="Backbone preset the checkpoint was trained with: bb, bl, bl336 or tiny.")] = "bl",
    sam: Annotated[str | None, typer.Option(help="SAM variant: vit_b, vit_l, vit_h (overrides the preset).")] = None,
    sam_checkpoint: Annotated[str | None, typer.Option(help="SAM weights file, e.g. sam_vit_b_01ec64.pth.")] = None,
    clip: Annotated[str | None, typer.Option(help="open_clip model name (overrides the preset).")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag (openai) or a weights file.")] = None,
    clip_size: Annotated[int | None, typer.Option(help="CLIP input size S (overrides the preset).")] = None,
    sam_tokens: Annotated[int | None, typer.Option(help="Box prompts: 1 (single-mask token, paper) or 3 (multimask), as the checkpoint was trained.")] = None,
    masks: Annotated[bool, typer.Option(help="SAM's masks: drawn in the PNG and stored (COCO RLE) in the JSON.")] = True,
    attention: Annotated[bool, typer.Option(help="Also write OUT/<stem>.attention.png: each region's attention over the CLIP map.")] = False,
    embeddings: Annotated[bool, typer.Option(help="Also write OUT/<stem>.embeddings.npy: float32 [N, D] region embeddings.")] = False,
    topk: Annotated[int, typer.Option(help="Labels listed per region, best first.")] = 5,
    out: Annotated[Path, typer.Option(help="Output folder: <stem>.json and <stem>.png per image.")] = Path("predictions"),
    batch_size: Annotated[int, typer.Option(help="Images per backbone forward pass.")] = 4,
    max_boxes: Annotated[int | None, typer.Option(help="--boxes-file: keep each image's N highest-scoring boxes.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Name regions of your own images: boxes, clicks or SAM's automatic regions, any vocabulary.

    Writes OUT/<stem>.json (regions in prompt order: box, label, score, top-k, SAM IoU, mask) and
    OUT/<stem>.png (masks, boxes and "label score" drawn on the image).
    """
    from regionspot.predict_batch import run_predict
    from regionspot.predict_inputs import PredictConfig

    cfg = PredictConfig(
        images=list(images), vocab=vocab, vocab_file=vocab_file, boxes=boxes, boxes_file=boxes_file, points=points,
        checkpoint=checkpoint, backbones=backbones, sam=sam, sam_checkpoint=sam_checkpoint, clip=clip,
        clip_pretrained=clip_pretrained, clip_size=clip_size, sam_tokens=sam_tokens,
        masks=masks, attention=attention, embeddings=embeddings, topk=topk, out=out, batch_size=batch_size,
        max_boxes=max_boxes, device=device,
    )
    run_predict(cfg, show_progress=progress)


# --- end predict ---

# --- quickstart ---
@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Output folder: shards, runs, metrics.json, control_metrics.json.")] = Path("runs/quickstart"),
    data_root: Annotated[Path | None, typer.Option(help="Where the toy dataset is generated (default: $REGIONSPOT_DATASETS, else datasets/).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps for the head and for the control.")] = 600,
    train_images: Annotated[int | None, typer.Option(help="Use only the first N toy training images.")] = None,
    val_images: Annotated[int | None, typer.Option(help="Evaluate on the first N toy_val images.")] = None,
) -> None:
    """The whole pipeline on a CPU in minutes: toy data, tiny random backbones, extract -> train -> eval,
    next to a control trained on shuffled labels. A pipeline check, not the paper's accuracy."""
    from regionspot.quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(out=out, data_root=data_root, steps=steps, train_images=train_images,
                                    val_images=val_images))


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
