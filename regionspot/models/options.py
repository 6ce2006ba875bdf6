"""The backbone options every online stage takes (`--backbones --sam --sam-checkpoint --clip
--clip-pretrained --clip-size --sam-tokens`), declared once: names, types, defaults and help.

`ExtractConfig`, `EvalConfig` and `PredictConfig` inherit `BackboneOptions`; the CLI builds these
flags from its fields; `spec()` is the one way the stages resolve them (`presets.resolve_backbones`:
files, tags and sizes checked, nothing loaded). The head checkpoint that eval and predict take is
`checkpoint_option`'s. This module stays light (no torch), so the CLI can read it to build its help.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from regionspot.options import option

# The choices as types: typer lists them in --help and refuses anything else. presets.py implements
# them (PRESETS, SAM_MODELS); a test keeps the two in step.
Preset = Literal["bb", "bl", "bl336", "tiny"]
SamModel = Literal["vit_b", "vit_l", "vit_h", "tiny"]
SamTokens = Literal[1, 3]
Precision = Literal["fp16", "bf16", "fp32"]  # models/frozen.py PRECISIONS
SamAttention = Literal["sdpa", "library"]  # models/sam_attention.py SAM_ATTENTION

# How the backbones run, not what they compute: recorded in the manifest's "runtime", outside the
# fingerprint (models/presets.py load_backbones says why).
RUNTIME = ("precision", "sam_attention", "compile")


def checkpoint_option(note: str = "") -> Any:
    """The `--checkpoint` of a stage that runs a trained head (eval, predict); `note` adds what holds
    for that stage only."""
    return option(
        None, "Checkpoint directory (runs/NAME/checkpoints/last), head.safetensors or an official RegionSpot "
        f".pth (which takes the fingerprint of --backbones).{note}"
    )  # fmt: skip


@dataclass
class BackboneOptions:
    backbones: Preset = option(
        "bl",
        "Backbone preset: bb (SAM ViT-B + CLIP ViT-B/16), bl (SAM ViT-B + CLIP ViT-L/14), bl336 (+ CLIP "
        "ViT-L/14 at 336 px) or tiny (small random backbones, no weights); the flags below override parts of it.",
    )
    sam: SamModel | None = option(None, "SAM variant, instead of the preset's.")
    sam_checkpoint: str | None = option(
        None, "SAM weights file, e.g. sam_vit_b_01ec64.pth (needed for vit_b, vit_l, vit_h)."
    )
    clip: str | None = option(None, "open_clip model name, e.g. ViT-L-14-quickgelu, instead of the preset's.")
    clip_pretrained: str | None = option(
        None, "open_clip pretrained tag (openai) or a weights file, instead of the preset's."
    )
    clip_size: int | None = option(
        None, "CLIP input size S: the image is resized to S x S (a multiple of the patch size).", min=1
    )
    sam_tokens: SamTokens | None = option(
        None,
        "SAM tokens per region: 1, the single-mask token (paper; the preset's), or 3, the multimask "
        "tokens; features and checkpoints must agree.",
    )

    clip_antialias: bool = option(
        False,
        "Antialias CLIP's S x S resize. Off by default, as the official pipeline (the released heads were "
        "trained without it); it changes the stored features and so the backbones fingerprint.",
    )
    precision: Precision | None = option(
        None, "Backbones' precision: fp16 (the official code's; default on a GPU), bf16, or fp32 (default "
        "on the CPU). Recorded in the manifest."
    )  # fmt: skip
    sam_attention: SamAttention = option(
        "sdpa", "SAM image encoder attention: sdpa (fused scaled_dot_product_attention, same numbers) or "
        "library (segment_anything's own)."
    )  # fmt: skip
    compile: bool = option(False, "Run the encoders through torch.compile (falls back with a warning).")

    def backbone_overrides(self) -> dict:
        """The flags that override the preset, by field name (to hand these options on to another stage)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(BackboneOptions)
            if f.name != "backbones" and f.name not in RUNTIME
        }

    def runtime(self) -> dict:
        """How `load_backbones` runs the encoders: precision, SAM attention kernel, compile."""
        return {name: getattr(self, name) for name in RUNTIME}

    def spec(self):
        """The resolved `models.presets.BackboneSpec`: every choice checked, nothing loaded.

        Raises: RegionSpotError naming every bad flag at once.
        """
        from regionspot.models.presets import resolve_backbones

        return resolve_backbones(self.backbones, **self.backbone_overrides())
