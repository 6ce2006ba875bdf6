"""Head checkpoints: `head.safetensors` = the head's weights + metadata (head config, backbones fingerprint).

Layout of a training run (DESIGN.md §5):

    runs/NAME/checkpoints/step-0005000/head.safetensors   weights; metadata "config" (JSON of
                                                          RegionSpotHead.config()), "fingerprint",
                                                          "imported" ("true" for official imports)
    runs/NAME/checkpoints/step-0005000/trainer_state.pt   optimiser, step, data position, RNG states
                                                          (torch.load(..., weights_only=True))
    runs/NAME/checkpoints/step-0005000/config.yaml        the resolved TrainConfig
    runs/NAME/checkpoints/last                            a one-line text file naming the newest
                                                          step directory ("step-0005000")

`last` is a small pointer file, not a symlink: it is written atomically (temp + rename) and works on
every filesystem, in zips and object stores, and on Windows; everything that takes `--checkpoint`
follows it. Read a head anywhere with `load_head(path)`: a step directory, `last`, the run folder, a
`head.safetensors`, or an official RegionSpot `.pth`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regionspot.errors import RegionSpotError
from regionspot.models.head import OFFICIAL_PREFIX, RegionSpotHead

HEAD_FILE = "head.safetensors"
LAST = "last"
FORMAT = "regionspot-head"


def save_head(
    head: RegionSpotHead, directory: Path | str, fingerprint: str, extra_meta: dict | None = None
) -> Path:
    """Write `directory/head.safetensors` atomically.

    Args:
        head: the head (any device/dtype; stored as its parameters are).
        directory: created when missing.
        fingerprint: the backbones fingerprint of the features the head was trained on ("" if unknown).
        extra_meta: more metadata; values are stored as JSON strings.
    Returns:
        the file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        **{k: json.dumps(v) for k, v in (extra_meta or {}).items()},
        "format": FORMAT,
        "config": json.dumps(head.config()),
        "fingerprint": fingerprint or "",
    }
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    path = directory / HEAD_FILE
    tmp = directory / f".{HEAD_FILE}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def write_last(checkpoints: Path | str, step_dir: Path | str) -> None:
    """Point `checkpoints/last` at `step_dir` (a directory inside `checkpoints`), atomically."""
    checkpoints = Path(checkpoints)
    tmp = checkpoints / f".{LAST}.tmp-{os.getpid()}"
    tmp.write_text(Path(step_dir).name + "\n")
    os.replace(tmp, checkpoints / LAST)


def read_last(checkpoints: Path | str) -> Path | None:
    """The step directory `checkpoints/last` names (None when there is no `last`)."""
    last = Path(checkpoints) / LAST
    if last.is_dir():  # a symlink someone made by hand
        return last.resolve()
    if not last.is_file():
        return None
    target = Path(checkpoints) / last.read_text().strip()
    if not target.is_dir():
        raise RegionSpotError(f"{last} names {target.name}, which is missing; point it at a step-* directory")
    return target


def resolve_checkpoint(path: Path | str) -> Path:
    """The file a `--checkpoint` names: a head.safetensors or an official .pth.

    Accepts a step directory, a `last` pointer, a `checkpoints` folder, a run folder, or the file.
    """
    path = Path(path)
    if path.name == LAST and path.is_file():
        path = read_last(path.parent)
    if path.is_dir():
        for checkpoints in (path, path / "checkpoints"):
            if not (path / HEAD_FILE).exists() and (checkpoints / LAST).exists():
                return resolve_checkpoint(read_last(checkpoints))
        path = path / HEAD_FILE
    if not path.is_file():
        raise RegionSpotError(
            f"checkpoint {path}: no such file; pass a checkpoint directory (runs/NAME/checkpoints/last), "
            "a head.safetensors or an official RegionSpot .pth"
        )
    return path


def head_file_metadata(path: Path | str) -> dict:
    """The metadata of a head.safetensors (after resolving directories and `last`)."""
    file = resolve_checkpoint(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise RegionSpotError(f"checkpoint {file}: not a readable safetensors file ({e})") from e


# --- the checkpoints released with the paper ---------------------------------------------------------
# An official RegionSpot `.pth` is a detectron2 checkpoint: ckpt["model"] holds the head under
# `model.to_clip/decoder/projector` beside frozen `model.sam.*` / `model.clip_model.*` weights (skipped).

OFFICIAL_LOGIT_SCALE = 100.0  # exp of OpenAI CLIP's logit_scale; the released heads were trained with it
_HEAD_PARTS = ("to_clip", "decoder", "projector")
# numpy globals that pickled numpy scalars/arrays need; they only rebuild arrays (no code runs).
_NUMPY_GLOBALS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)


def read_official_head(path: str | Path) -> RegionSpotHead:
    """The head of an official RegionSpot `.pth` (regionspot_bb.pth, regionspot_bl.pth, ...).

    The file is read with `torch.load(weights_only=True)`: tensors and plain containers only, never
    code. Dimensions come from the tensor shapes; the logit scale is 100 (the OpenAI CLIPs the paper used).
    Raises RegionSpotError for a missing/unreadable file or missing head weights.
    """
    return official_head_from_state_dict(read_official_checkpoint(path), str(path))


def official_head_from_state_dict(state: dict, source: str = "checkpoint") -> RegionSpotHead:
    """Build the head from an official state dict (keys `model.to_clip.weight`, ...)."""
    ours = {
        k[len(OFFICIAL_PREFIX) :]: v
        for k, v in state.items()
        if isinstance(k, str)
        and k.startswith(OFFICIAL_PREFIX)
        and k[len(OFFICIAL_PREFIX) :].split(".")[0] in _HEAD_PARTS
    }
    if "to_clip.weight" not in ours or not any(k.startswith("decoder.layers.") for k in ours):
        raise RegionSpotError(
            f"{source} is not a RegionSpot checkpoint: no {OFFICIAL_PREFIX}to_clip / "
            f"{OFFICIAL_PREFIX}decoder.layers.* weights; pass an official regionspot_*.pth"
        )
    clip_width, sam_dim = ours["to_clip.weight"].shape
    embed_dim = ours["projector.weight"].shape[0] if "projector.weight" in ours else clip_width
    layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("decoder.layers."))
    ff = ours.get("decoder.layers.0.linear1.weight")
    head = RegionSpotHead(
        clip_width,
        embed_dim,
        sam_dim=sam_dim,
        num_layers=layers,
        ff_dim=ff.shape[0] if ff is not None else 2048,
        logit_scale=OFFICIAL_LOGIT_SCALE,
    )
    expected = head.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        shown = ", ".join(OFFICIAL_PREFIX + m for m in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise RegionSpotError(
            f"{source}: {len(missing)} head weight(s) missing: {shown}{more}; the file is incomplete "
            "or not an official RegionSpot checkpoint"
        )
    wrong = [k for k, v in expected.items() if tuple(ours[k].shape) != tuple(v.shape)]
    if wrong:
        raise RegionSpotError(
            f"{source}: {OFFICIAL_PREFIX}{wrong[0]} has shape {list(ours[wrong[0]].shape)}, expected "
            f"{list(expected[wrong[0]].shape)} for a head of width {clip_width}"
        )
    head.load_state_dict({k: ours[k].float() for k in expected})
    return head


def read_official_checkpoint(path: str | Path) -> dict:
    """The `model` state dict of an official RegionSpot `.pth`, read without unpickling code.

    detectron2 checkpoints may also hold numpy arrays/scalars (trainer state); those are allowed as
    data. Any other object (a class the file would have to import) is refused with its name, and the
    message says how to strip it where the file is trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise RegionSpotError(
            f"checkpoint {path}: no such file; pass an official RegionSpot .pth (regionspot_bl.pth, ...)"
        )
    allowed = []
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (legacy format): torch.load below says what it is
        unsafe = []
    refused = [g for g in unsafe if g not in _NUMPY_GLOBALS and not g.startswith("numpy.dtypes.")]
    if refused:
        raise RegionSpotError(
            f"checkpoint {path} holds Python objects that loading would have to import ({', '.join(refused[:4])}); "
            "regionspot reads weights only. Where you trust the file, re-save just its 'model' dict of tensors "
            "(the official tools/re_save_ckpt.py does this) and pass that file"
        )
    if unsafe:
        import importlib

        import numpy as np

        for name in unsafe:
            module, _, attr = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError):
                pass
        # pickled dtypes name their class (numpy.dtypes.Float64DType, ...) only inside the reduce call
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegionSpotError(
            f"checkpoint {path}: cannot be read as a weights-only torch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict):  # a bare state dict (e.g. re-saved without the "model" wrapper)
        return ckpt
    raise RegionSpotError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not a RegionSpot state dict")


def load_head(
    path: Path | str, fingerprint_if_imported: str | None = None
) -> tuple[RegionSpotHead, str | None, bool]:
    """Load a head from anything `--checkpoint` accepts.

    Args:
        path: a step directory (runs/X/checkpoints/step-N), `last`, a run folder, a head.safetensors,
            or an official RegionSpot .pth (recognised by its `model.decoder.*` keys).
        fingerprint_if_imported: the fingerprint of the backbones the command names; an official
            checkpoint (or one converted without a fingerprint) takes it.
    Returns:
        (head in eval mode on the CPU, backbones fingerprint or None, imported: bool).
    """
    file = resolve_checkpoint(path)
    if file.suffix != ".safetensors":
        head = read_official_head(file)
        return head.eval(), fingerprint_if_imported, True
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RegionSpotError(f"checkpoint {file}: not a readable safetensors file ({e})") from e
    if "config" not in meta:
        raise RegionSpotError(
            f"checkpoint {file}: no head configuration in its metadata; not a regionspot head"
        )
    try:
        head = RegionSpotHead(**json.loads(meta["config"]))
    except (TypeError, ValueError) as e:
        raise RegionSpotError(f"checkpoint {file}: invalid head configuration ({e})") from e
    missing = sorted(set(head.state_dict()) - set(state))
    if missing:
        raise RegionSpotError(f"checkpoint {file}: {len(missing)} weight(s) missing (first: {missing[0]})")
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise RegionSpotError(f"checkpoint {file}: weights do not fit its configuration ({e})") from e
    imported = meta.get("imported") == "true"
    fingerprint = meta.get("fingerprint") or None
    if fingerprint is None and imported:
        fingerprint = fingerprint_if_imported
    return head.eval(), fingerprint, imported


def convert_official(path: Path | str, out: Path | str, fingerprint: str | None = None) -> Path:
    """Write an official `.pth` as a checkpoint directory `out/` holding head.safetensors.

    The head is marked imported; without `fingerprint` it takes the backbones' fingerprint of
    whichever command loads it (as the .pth itself would).
    """
    head = read_official_head(path)
    save_head(head, out, fingerprint or "", {"imported": True, "source": Path(path).name})
    return Path(out)


__all__ = [
    "HEAD_FILE",
    "LAST",
    "convert_official",
    "head_file_metadata",
    "load_head",
    "read_last",
    "resolve_checkpoint",
    "save_head",
    "write_last",
    "head_fingerprint",
]


# --- the fingerprint a loaded head answers to ------------------------------------------------------
# (its own block: eval and predict both apply this rule; DESIGN.md §5)


def head_fingerprint(fingerprint: str | None, chosen_backbones) -> str:
    """The backbones fingerprint a loaded head answers to.

    A head trained here carries the fingerprint of the features it was trained on. An imported
    official head (a .pth, or a conversion of one) carries none: it takes the fingerprint of the
    backbones the command names.

    Args:
        fingerprint: what `load_head` returned for the head (None or "" when it carries none).
        chosen_backbones: a function of no arguments returning the chosen backbones' fingerprint;
            called only for a head without one, since it may have to load the backbones.
    """
    return fingerprint or chosen_backbones()
