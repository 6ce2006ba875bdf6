"""Head checkpoints: `head.safetensors` (weights + config + backbone fingerprint in its metadata).

A training checkpoint is a directory `runs/NAME/checkpoints/step-NNNNNNN/` holding `head.safetensors`,
`trainer_state.pt` and `config.yaml`; `runs/NAME/checkpoints/last` is a small text file naming the
newest step directory (a file, not a symlink, so it works on every filesystem and in zips).
`load_head` takes any of: such a directory, `last`, a `head.safetensors`, or an official RegionSpot
`.pth` (recognised by its `model.decoder.*` keys).
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


def save_head(
    head: RegionSpotHead, directory: Path | str, fingerprint: str, extra_meta: dict | None = None
) -> Path:
    """Write `directory/head.safetensors` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "regionspot-head",
        "config": json.dumps(head.config()),
        "fingerprint": fingerprint,
        **{k: json.dumps(v) for k, v in (extra_meta or {}).items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    path = directory / HEAD_FILE
    tmp = directory / f".{HEAD_FILE}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def write_last(checkpoints: Path, step_dir: Path) -> None:
    tmp = checkpoints / f".{LAST}.tmp-{os.getpid()}"
    tmp.write_text(step_dir.name + "\n")
    os.replace(tmp, checkpoints / LAST)


def resolve_checkpoint(path: Path | str) -> Path:
    """The file a `--checkpoint` names: a head.safetensors, an official .pth, via dirs and `last`."""
    path = Path(path)
    if path.name == LAST and path.is_file():
        path = path.parent / path.read_text().strip()
    if path.is_dir():
        if (path / LAST).is_file() and not (path / HEAD_FILE).exists():
            return resolve_checkpoint(path / LAST)
        if (path / "checkpoints" / LAST).is_file():
            return resolve_checkpoint(path / "checkpoints" / LAST)
        path = path / HEAD_FILE
    if not path.exists():
        raise RegionSpotError(
            f"checkpoint {path}: no such file; pass a checkpoint directory (runs/NAME/checkpoints/last), "
            "a head.safetensors or an official RegionSpot .pth"
        )
    return path


def load_head(
    path: Path | str, fingerprint_if_imported: str | None = None
) -> tuple[RegionSpotHead, str | None, bool]:
    """(head in eval mode, backbone fingerprint, imported) for any checkpoint `--checkpoint` accepts.

    An official `.pth` carries no fingerprint: it takes `fingerprint_if_imported` (the fingerprint
    of the backbones the command names) and is marked imported.
    """
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise RegionSpotError(f"checkpoint {file}: not a readable safetensors file ({e})") from e
        if "config" not in meta:
            raise RegionSpotError(
                f"checkpoint {file}: no head configuration in its metadata; not a regionspot head"
            )
        head = RegionSpotHead(**json.loads(meta["config"]))
        head.load_state_dict(state)
        return head.eval(), meta.get("fingerprint"), meta.get("imported") == "true"
    head = RegionSpotHead.from_official_checkpoint(file)
    return head.eval(), fingerprint_if_imported, True


def convert_official(path: Path | str, out: Path | str, fingerprint: str | None = None) -> Path:
    """Write an official `.pth` as a regionspot checkpoint directory (`regionspot convert-official`)."""
    head = RegionSpotHead.from_official_checkpoint(path)
    save_head(head, out, fingerprint or "", {"imported": True, "source": str(path)})
    return Path(out)


def head_file_metadata(path: Path | str) -> dict:
    with safe_open(str(resolve_checkpoint(path)), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = [
    "HEAD_FILE",
    "LAST",
    "convert_official",
    "load_head",
    "resolve_checkpoint",
    "save_head",
    "write_last",
]
