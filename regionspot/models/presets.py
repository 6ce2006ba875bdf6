"""Backbone presets (`bb`, `bl`, `bl336`, `tiny`) and loading the frozen SAM + CLIP pair.

`resolve_backbones` checks every choice (names, sizes, token count, files, tags) before anything is
loaded; `load_backbones` builds the frozen encoders and the fingerprint (DESIGN.md §4) that ties
shards, checkpoints and predictions to the same weights; `backbones_for_checkpoint` is the preset a
head checkpoint's fingerprint names, for a command given no --backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import torch

from regionspot.errors import RegionSpotError
from regionspot.models.fingerprint import backbones_fingerprint, state_sha256
from regionspot.models.frozen import resolve_precision
from regionspot.models.tiny import TINY_CLIP_PATCH, TINY_CLIP_SIZE

SAM_MODELS = ("vit_b", "vit_l", "vit_h", "tiny")
CLIP_EXAMPLES = "ViT-B-16-quickgelu, ViT-L-14-quickgelu, ViT-L-14-336-quickgelu"


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbones to run; tags and paths say where weights come from, not what they are."""

    sam: str  # vit_b | vit_l | vit_h | tiny
    sam_checkpoint: str | None  # SAM .pth state dict (not for tiny)
    clip: str  # an open_clip model name (e.g. ViT-L-14-quickgelu) or tiny
    clip_pretrained: str | None  # an open_clip tag (openai) or a weights file (not for tiny)
    clip_size: int  # CLIP input size S (multiple of the patch size)
    sam_tokens: int = 1  # 1: the single-mask token; 3: the three multimask tokens
    clip_antialias: bool = False  # antialias CLIP's S x S resize (the official pipeline did not)


PRESETS: dict[str, BackboneSpec] = {
    "bb": BackboneSpec("vit_b", None, "ViT-B-16-quickgelu", "openai", 224),
    "bl": BackboneSpec("vit_b", None, "ViT-L-14-quickgelu", "openai", 224),
    "bl336": BackboneSpec("vit_b", None, "ViT-L-14-336-quickgelu", "openai", 336),
    "tiny": BackboneSpec("tiny", None, "tiny", None, TINY_CLIP_SIZE),
}


def list_presets() -> list[str]:
    """The names `--backbones` accepts."""
    return list(PRESETS)


def resolve_backbones(preset: str = "bl", **overrides) -> BackboneSpec:
    """The preset with the user's flags applied (None keeps the preset's value), fully checked.

    Args:
        preset: bb, bl, bl336 or tiny.
        overrides: any BackboneSpec field (sam, sam_checkpoint, clip, clip_pretrained, clip_size, sam_tokens).
    Raises: RegionSpotError naming every bad flag at once, before any model is loaded.
    """
    if preset not in PRESETS:
        raise RegionSpotError(f"--backbones {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(BackboneSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"resolve_backbones() got unknown overrides {unknown}; known: {sorted(names)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    for key in ("sam_checkpoint", "clip_pretrained"):
        if key in values:
            values[key] = str(values[key])
    spec = replace(PRESETS[preset], **values)
    problems = _sam_problems(spec) + _clip_problems(spec)
    if problems:
        raise RegionSpotError("; ".join(problems))
    return spec


def _sam_problems(spec: BackboneSpec) -> list[str]:
    from regionspot.models.sam import SAM_CHECKPOINTS  # here: checking flags need not load segment_anything

    problems = []
    if spec.sam not in SAM_MODELS:
        problems.append(f"--sam {spec.sam!r}: unknown SAM; choose one of {', '.join(SAM_MODELS)}")
    elif spec.sam == "tiny":
        if spec.sam_checkpoint is not None:
            problems.append(
                f"--sam-checkpoint {spec.sam_checkpoint}: --sam tiny is built from a fixed seed and takes none"
            )
    elif spec.sam_checkpoint is None:
        url = SAM_CHECKPOINTS[spec.sam]
        problems.append(
            f"--sam-checkpoint is needed for --sam {spec.sam}: download {url.rsplit('/', 1)[1]} from {url}"
        )
    elif not Path(spec.sam_checkpoint).is_file():
        problems.append(
            f"--sam-checkpoint {spec.sam_checkpoint}: no such file; SAM {spec.sam} weights: {SAM_CHECKPOINTS[spec.sam]}"
        )
    if not isinstance(spec.sam_tokens, int) or spec.sam_tokens not in (1, 3):
        problems.append(
            f"--sam-tokens {spec.sam_tokens}: choose 1 (single-mask token) or 3 (multimask tokens)"
        )
    return problems


def _clip_problems(spec: BackboneSpec) -> list[str]:
    problems = []
    if spec.clip == "tiny":
        patch = TINY_CLIP_PATCH
        if spec.clip_pretrained is not None:
            problems.append(
                f"--clip-pretrained {spec.clip_pretrained}: --clip tiny is built from a fixed seed and takes none"
            )
    else:
        import open_clip

        config = open_clip.get_model_config(spec.clip) if spec.clip in open_clip.list_models() else None
        vision = (config or {}).get("vision_cfg", {})
        if config is None:
            problems.append(f"--clip {spec.clip!r}: not an open_clip model; e.g. {CLIP_EXAMPLES} (or tiny)")
            return problems
        if not vision.get("patch_size") or "timm_model_name" in vision:
            problems.append(
                f"--clip {spec.clip!r}: RegionSpot needs an open_clip vision transformer; e.g. {CLIP_EXAMPLES}"
            )
            return problems
        patch = int(vision["patch_size"])
        problems += _pretrained_problems(spec, config)
    if not isinstance(spec.clip_antialias, bool):
        problems.append(f"--clip-antialias {spec.clip_antialias!r}: a flag (true or false)")
    if not isinstance(spec.clip_size, int) or spec.clip_size <= 0 or spec.clip_size % patch:
        problems.append(
            f"--clip-size {spec.clip_size}: must be a positive multiple of {spec.clip}'s patch size {patch}"
        )
    return problems


def _pretrained_problems(spec: BackboneSpec, config: dict) -> list[str]:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(spec.clip)
    pretrained = spec.clip_pretrained
    if pretrained is None:
        return [
            f"--clip-pretrained is needed for --clip {spec.clip}: a weights file or a tag ({', '.join(tags)})"
        ]
    if Path(pretrained).is_file():
        return []  # a file's activation cannot be read from it; OpenAI TorchScript files are checked on load
    if pretrained not in tags:
        return [
            f"--clip-pretrained {pretrained}: no such file, nor a tag of {spec.clip} "
            f"({', '.join(tags) or 'it has none'})"
        ]
    # open_clip only warns when a tag's activation differs from the model's (QuickGELU vs GELU)
    tag_quick = bool(open_clip.get_pretrained_cfg(spec.clip, pretrained).get("quick_gelu", False))
    model_quick = bool(config.get("quick_gelu", False))
    if tag_quick != model_quick:
        base = spec.clip.removesuffix("-quickgelu")
        fix = f"{base}-quickgelu" if tag_quick else base
        act = {True: "QuickGELU", False: "GELU"}
        return [
            f"--clip {spec.clip} --clip-pretrained {pretrained}: these weights were trained with "
            f"{act[tag_quick]} but {spec.clip} uses {act[model_quick]}; use --clip {fix}"
        ]
    return []


@dataclass
class Backbones:
    """The loaded frozen pair, what identifies it, and how it runs."""

    sam: object  # models.sam.SamRegionEncoder
    clip: object  # models.clip.ClipMapEncoder
    spec: BackboneSpec
    fingerprint: str
    sam_sha256: str
    clip_sha256: str
    sam_attention: str = "sdpa"
    compiled: bool = False

    def info(self) -> dict:
        """The manifest's "backbones" section (DESIGN.md §4): what the features are ("sam", "clip",
        "fingerprint") and how they were computed ("runtime": not in the fingerprint)."""
        return {
            "sam": {
                "model": self.spec.sam,
                "weights_sha256": self.sam_sha256,
                "tokens": self.spec.sam_tokens,
            },
            "clip": {
                "model": self.spec.clip,
                "pretrained": self.spec.clip_pretrained,
                "weights_sha256": self.clip_sha256,
                "image_size": self.clip.image_size,
                "antialias": self.spec.clip_antialias,
                "width": self.clip.width,
                "embed_dim": self.clip.embed_dim,
                "logit_scale": self.clip.logit_scale,
            },
            "runtime": {
                "precision": self.sam.precision,
                "sam_attention": self.sam_attention,
                "compile": self.compiled,
            },
            "fingerprint": self.fingerprint,
        }


def load_backbones(
    spec: BackboneSpec,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    sam_attention: str = "sdpa",
    compile: bool = False,
) -> Backbones:
    """Load the frozen SAM and CLIP of a resolved `spec` onto `device`.

    Args:
        spec: from resolve_backbones.
        device: where the encoders run.
        precision: fp16, bf16 (autocast) or fp32; None: fp16 on CUDA, fp32 on the CPU (models/frozen.py).
        sam_attention: "sdpa" (the fast path, models/sam_attention.py) or "library".
        compile: run the encoders' hot modules through torch.compile; a failure warns, then runs eagerly.
    Weights are hashed on the CPU as loaded, before any move, cast or compile. The fingerprint covers
    what changes the features (weights, token choice, CLIP size and antialias); precision, attention
    kernel and compile only move them within float rounding, so they are recorded under "runtime" in
    `info()` and leave the fingerprint alone: features computed in fp16 on a GPU and in fp32 on a CPU
    are the same features, and a head trained on one serves the other.
    """
    from regionspot.models.clip import ClipMapEncoder, load_clip
    from regionspot.models.sam import SamRegionEncoder, load_sam

    precision = resolve_precision(precision, device)
    sam_model = load_sam(spec.sam, spec.sam_checkpoint, sam_attention)
    clip_model, tokenizer, mean, std = load_clip(spec.clip, spec.clip_pretrained, spec.clip_size)
    sam_sha, clip_sha = state_sha256(sam_model), state_sha256(clip_model)
    sam = SamRegionEncoder(sam_model, spec.sam_tokens, precision).to(device)
    clip = ClipMapEncoder(
        clip_model, tokenizer, spec.clip_size, mean, std, precision, antialias=spec.clip_antialias
    ).to(device)
    if compile:
        sam.use_compile()
        clip.use_compile()
    fingerprint = backbones_fingerprint(
        sam_sha, clip_sha, spec.sam_tokens, spec.clip_size, clip_antialias=spec.clip_antialias
    )
    return Backbones(sam, clip, spec, fingerprint, sam_sha, clip_sha, sam_attention, compile)


@lru_cache(maxsize=2)
def _tiny_fingerprint(sam_tokens: int) -> str:
    return load_backbones(resolve_backbones("tiny", sam_tokens=sam_tokens)).fingerprint


def checkpoint_preset(checkpoint: Path | str) -> dict:
    """The backbone options a checkpoint's backbones fingerprint names, where it names a preset.

    Only the `tiny` preset's fingerprint is known without weights files; a real preset's depends on
    the weights, and an official .pth carries none. Returns {"backbones": "tiny", "sam_tokens": 1 or 3},
    or {} when the fingerprint names no preset (or the checkpoint cannot be read: loading it says why).
    """
    from regionspot.models.checkpoint import head_file_metadata, resolve_checkpoint

    try:
        file = resolve_checkpoint(checkpoint)
        fingerprint = head_file_metadata(file).get("fingerprint") if file.suffix == ".safetensors" else None
    except RegionSpotError:
        return {}
    for tokens in (1, 3):
        if fingerprint and fingerprint == _tiny_fingerprint(tokens):
            return {"backbones": "tiny", "sam_tokens": tokens}
    return {}


def backbones_for_checkpoint(backbones: str | None, checkpoint: Path | str | None) -> dict:
    """The backbone options a command without --backbones takes from its checkpoint ({} for none).

    Args:
        backbones: the --backbones given, or None when it was not given.
        checkpoint: the --checkpoint given (None: no checkpoint, nothing to take).
    Raises:
        RegionSpotError when --backbones names another preset than the checkpoint's fingerprint does.
    """
    if checkpoint is None or backbones == "tiny" or not Path(checkpoint).exists():
        return {}
    found = checkpoint_preset(checkpoint)
    if found and backbones is not None:
        raise RegionSpotError(
            f"checkpoint {checkpoint} carries the backbones fingerprint of the {found['backbones']} preset, "
            f"not of --backbones {backbones}; pass --backbones {found['backbones']} or leave --backbones out"
        )
    return found
