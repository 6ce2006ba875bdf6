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

from safetensors import safe_open
from safetensors.torch import save_file

from regionspot.errors import RegionSpotError
from regionspot.models.head import RegionSpotHead

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
        head = RegionSpotHead.from_official_checkpoint(file)
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
    head = RegionSpotHead.from_official_checkpoint(path)
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
