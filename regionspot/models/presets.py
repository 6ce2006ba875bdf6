"""Backbone presets (`bb`, `bl`, `bl336`, `tiny`) and loading the frozen SAM + CLIP pair.

`resolve_backbones` checks every choice before anything is loaded; `load_backbones` builds the
encoders and the fingerprint that ties shards, checkpoints and predictions to the same weights.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from regionspot.errors import RegionSpotError

TINY_SEED = 20231102
SAM_NAMES = ("vit_b", "vit_l", "vit_h", "tiny")


@dataclass(frozen=True)
class BackboneSpec:
    sam: str
    sam_checkpoint: str | None
    clip: str
    clip_pretrained: str | None
    clip_size: int
    sam_tokens: int = 1


PRESETS: dict[str, BackboneSpec] = {
    "bb": BackboneSpec("vit_b", None, "ViT-B-16-quickgelu", "openai", 224),
    "bl": BackboneSpec("vit_b", None, "ViT-L-14-quickgelu", "openai", 224),
    "bl336": BackboneSpec("vit_b", None, "ViT-L-14-336-quickgelu", "openai", 336),
    "tiny": BackboneSpec("tiny", None, "tiny", None, 64),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def _clip_patch(name: str) -> int | None:
    if name == "tiny":
        return 8
    import open_clip

    if name not in open_clip.list_models():
        return None
    cfg = open_clip.get_model_config(name) or {}
    return int(cfg.get("vision_cfg", {}).get("patch_size", 16))


def resolve_backbones(preset: str = "bl", **overrides) -> BackboneSpec:
    """The preset with the flags the user gave (None = keep the preset's), every problem named at once."""
    if preset not in PRESETS:
        raise RegionSpotError(f"unknown backbones preset {preset!r}; available: {', '.join(PRESETS)}")
    spec = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    problems = []
    if spec.sam not in SAM_NAMES:
        problems.append(f"--sam {spec.sam!r}: choose one of {', '.join(SAM_NAMES)}")
    elif spec.sam != "tiny":
        from regionspot.models.sam import SAM_CHECKPOINTS

        if spec.sam_checkpoint is None:
            problems.append(
                f"--sam-checkpoint is needed for SAM {spec.sam}: download {SAM_CHECKPOINTS[spec.sam]}"
            )
        elif not Path(spec.sam_checkpoint).is_file():
            problems.append(
                f"--sam-checkpoint {spec.sam_checkpoint}: no such file "
                f"(SAM {spec.sam} weights: {SAM_CHECKPOINTS[spec.sam]})"
            )
    if spec.sam_tokens not in (1, 3):
        problems.append(f"--sam-tokens {spec.sam_tokens}: choose 1 or 3")
    patch = _clip_patch(spec.clip)
    if patch is None:
        problems.append(f"--clip {spec.clip!r}: not an open_clip model (see open_clip.list_models())")
    elif spec.clip_size % patch:
        problems.append(f"--clip-size {spec.clip_size}: must be a multiple of the patch size {patch}")
    if spec.clip != "tiny" and spec.clip_pretrained is None:
        problems.append(
            f"--clip-pretrained is needed for {spec.clip}: an open_clip tag (openai) or a weights file"
        )
    pretrained = spec.clip_pretrained
    if pretrained and ("/" in pretrained or Path(pretrained).suffix) and not Path(pretrained).is_file():
        problems.append(f"--clip-pretrained {pretrained}: no such file")
    if problems:
        raise RegionSpotError("; ".join(problems))
    return spec


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: sorted names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbones_fingerprint(sam_sha256: str, clip_sha256: str, sam_tokens: int, clip_size: int) -> str:
    """Weights, token choice and CLIP input size; names, tags and paths are information only."""
    key = json.dumps({"sam": sam_sha256, "clip": clip_sha256, "tokens": sam_tokens, "clip_size": clip_size})
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Backbones:
    sam: object  # SamRegionEncoder
    clip: object  # ClipMapEncoder
    spec: BackboneSpec
    fingerprint: str
    sam_sha256: str
    clip_sha256: str

    def info(self) -> dict:
        """The manifest's "backbones" section."""
        return {
            "sam": {
                "model": self.spec.sam,
                "checkpoint": self.spec.sam_checkpoint,
                "weights_sha256": self.sam_sha256,
                "tokens": self.spec.sam_tokens,
            },
            "clip": {
                "model": self.spec.clip,
                "pretrained": self.spec.clip_pretrained,
                "weights_sha256": self.clip_sha256,
                "image_size": self.spec.clip_size,
                "width": self.clip.width,
                "embed_dim": self.clip.embed_dim,
                "logit_scale": self.clip.logit_scale,
            },
            "fingerprint": self.fingerprint,
        }


def _seeded(build):
    """Build a tiny model from a fixed seed, whatever the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def _load_sam(spec: BackboneSpec):
    from regionspot.models.sam import build_sam

    if spec.sam == "tiny":
        return _seeded(lambda: build_sam("tiny"))
    sam = build_sam(spec.sam)
    # segment_anything's builders unpickle with a plain torch.load: load the weights ourselves, safely
    try:
        state = torch.load(spec.sam_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegionSpotError(f"--sam-checkpoint {spec.sam_checkpoint}: cannot read SAM weights ({e})") from e
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise RegionSpotError(
            f"--sam-checkpoint {spec.sam_checkpoint} does not hold SAM {spec.sam} weights "
            f"({first}); pick the matching --sam"
        ) from e
    return sam


def _load_clip(spec: BackboneSpec):
    """(model, tokenizer, mean, std)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from regionspot.models.clip import build_tiny_clip, is_torchscript

    if spec.clip == "tiny":
        return (
            _seeded(build_tiny_clip),
            open_clip.get_tokenizer("ViT-B-32"),
            OPENAI_DATASET_MEAN,
            OPENAI_DATASET_STD,
        )
    tokenizer = open_clip.get_tokenizer(spec.clip)
    path = Path(spec.clip_pretrained)
    try:
        if path.is_file() and is_torchscript(path):
            model = open_clip.load_openai_model(str(path), device="cpu", jit=False)
            native = (
                model.visual.image_size[0]
                if isinstance(model.visual.image_size, tuple)
                else model.visual.image_size
            )
            if native != spec.clip_size:  # interpolate position embeddings only for a new size
                from open_clip.model import resize_pos_embed

                state = model.state_dict()
                model = open_clip.create_model(spec.clip, pretrained=None, force_image_size=spec.clip_size)
                resize_pos_embed(state, model)
                model.load_state_dict(state)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*QuickGELU mismatch.*")
                model = open_clip.create_model(
                    spec.clip,
                    pretrained=str(spec.clip_pretrained),
                    force_image_size=spec.clip_size,
                    weights_only=True,
                )
    except UserWarning as e:
        raise RegionSpotError(
            f"--clip {spec.clip} with --clip-pretrained {spec.clip_pretrained}: {e} "
            "OpenAI weights need the -quickgelu model names (e.g. ViT-L-14-quickgelu)"
        ) from e
    except RegionSpotError:
        raise
    except Exception as e:
        raise RegionSpotError(
            f"--clip {spec.clip} --clip-pretrained {spec.clip_pretrained}: cannot load CLIP weights ({e}); "
            "without network access pass a local weights file (OpenAI .pt, .bin or .safetensors)"
        ) from e
    cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    return model, tokenizer, cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)


def load_backbones(
    spec: BackboneSpec,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> Backbones:
    """Build the frozen SAM and CLIP encoders of `spec` on `device` (autocast applies on CUDA only)."""
    from regionspot.models.clip import ClipMapEncoder
    from regionspot.models.sam import SamRegionEncoder

    sam_model = _load_sam(spec)
    clip_model, tokenizer, mean, std = _load_clip(spec)
    sam_sha, clip_sha = state_sha256(sam_model), state_sha256(clip_model)
    sam = SamRegionEncoder(sam_model, spec.sam_tokens, autocast_dtype).to(device)
    clip = ClipMapEncoder(clip_model, tokenizer, spec.clip_size, mean, std, autocast_dtype).to(device)
    fingerprint = backbones_fingerprint(sam_sha, clip_sha, spec.sam_tokens, spec.clip_size)
    return Backbones(sam, clip, spec, fingerprint, sam_sha, clip_sha)


def spec_json(spec: BackboneSpec) -> dict:
    return asdict(spec)
