"""Frozen CLIP as an image feature map and a text encoder (DESIGN.md §2).

The map is the visual transformer's full token sequence before `ln_post` and the projection:
[1 + (S/patch)^2, width], class token first, for the image squashed to S x S (no crop). Text
embeddings are the mean of 81 prompt templates' raw embeddings, L2-normalised.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from regionspot.errors import RegionSpotError
from regionspot.models.frozen import FrozenEncoder, first_line
from regionspot.models.preprocess import as_chw, clip_input
from regionspot.models.tiny import build_tiny_clip

TEMPLATES_NAME = "{}. + openai-imagenet-80"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = open_clip.constants.OPENAI_DATASET_MEAN / _STD
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def text_templates() -> list:
    """The 81 prompt templates: "{}." and the 80 OpenAI ImageNet templates (callables name -> prompt)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [lambda c: f"{c}.", *OPENAI_IMAGENET_TEMPLATES]


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (OpenAI's own `.pt` files), False for a state dict.

    Both are zip files with data.pkl; only TorchScript holds `constants.pkl` (and `code/`), the test
    torch.load itself uses to refuse TorchScript under weights_only=True.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[-1] == "constants.pkl" for name in z.namelist())


@contextmanager
def _quiet_random_init():
    """Drop open_clip's "initialized randomly" warning while building an architecture we fill ourselves."""

    class Drop(logging.Filter):
        def filter(self, record):
            return "initialized randomly" not in record.getMessage()

    drop, root = Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _read_torchscript(name: str, path: Path) -> dict:
    """The state dict in OpenAI's TorchScript archive `path` (float32), for `name`'s architecture."""
    import open_clip

    if not (open_clip.get_model_config(name) or {}).get("quick_gelu", False):
        hint = f"{name}-quickgelu" if f"{name}-quickgelu" in open_clip.list_models() else "a -quickgelu model"
        raise RegionSpotError(
            f"--clip {name} with --clip-pretrained {path}: OpenAI weights were trained with QuickGELU "
            f"and {name} uses GELU; use --clip {hint}"
        )
    try:
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu").state_dict()
    except Exception as e:
        raise RegionSpotError(
            f"--clip-pretrained {path}: cannot read the TorchScript archive ({first_line(e)})"
        ) from e


def _architecture(name: str, image_size: int) -> nn.Module:
    """open_clip's `name` at `image_size`, weights left for the caller to fill."""
    import open_clip

    with _quiet_random_init():
        return open_clip.create_model(name, pretrained=None, force_image_size=image_size, device="cpu")


def _load_into(model: nn.Module, state: dict, source: str, name: str) -> nn.Module:
    """`state` (weights at the size they were trained at) loaded strictly into `model` (built at the
    wanted size). Position embeddings of another grid are interpolated as the official RegionSpot code
    does: bicubic without antialias (open_clip's default antialiases, which changes them even when
    upsampling); at the trained size they are kept as they are."""
    from open_clip.model import resize_pos_embed

    resize_pos_embed(state, model, interpolation="bicubic", antialias=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RegionSpotError(
            f"{source} does not hold {name} weights ({first_line(e)}); pick the matching --clip"
        ) from e
    return model


def _create(name: str, pretrained: str) -> nn.Module:
    """An open_clip tag or state-dict file (.bin, .safetensors, .pt) through create_model, weights_only,
    at the size the weights were trained at."""
    import open_clip

    is_file = Path(pretrained).is_file()
    try:
        with warnings.catch_warnings():
            # open_clip only warns when a tag was trained with another activation: the features would be wrong
            warnings.filterwarnings("error", message="QuickGELU mismatch", category=UserWarning)
            return open_clip.create_model(
                name,
                pretrained=pretrained,
                weights_only=True,
                device="cpu",
                precision="fp32",
            )
    except UserWarning as e:
        raise RegionSpotError(
            f"--clip {name} --clip-pretrained {pretrained}: {e} Use the matching model name "
            "(OpenAI weights need the -quickgelu names, e.g. ViT-L-14-quickgelu)"
        ) from e
    except Exception as e:
        if not is_file and "download" in str(e).lower():
            raise RegionSpotError(
                f"--clip-pretrained {pretrained}: cannot download the {name} weights ({first_line(e)}); "
                "without network access pass a local file: --clip-pretrained PATH "
                "(OpenAI's .pt, or open_clip's .bin / .safetensors)"
            ) from e
        what = "does not hold" if "state_dict" in str(e) else "cannot load"
        raise RegionSpotError(
            f"--clip-pretrained {pretrained}: {what} {name} weights ({first_line(e)}); "
            "pass a state dict (.bin, .safetensors, .pt) or an OpenAI TorchScript .pt of this --clip model"
        ) from e


def load_clip(name: str, pretrained: str | None, image_size: int):
    """(model, tokenizer, mean, std) of CLIP `name` (an open_clip model name or "tiny") on the CPU.

    `pretrained`: an open_clip tag (downloaded by open_clip) or a file: OpenAI TorchScript archives
    go through open_clip.load_openai_model, state dicts through create_model (weights_only).
    """
    import open_clip

    if name == "tiny":
        model = build_tiny_clip()
        if model.visual.image_size != (image_size, image_size):
            model = _load_into(build_tiny_clip(image_size), model.state_dict(), "--clip tiny", name)
        return model.eval(), open_clip.SimpleTokenizer(), OPENAI_MEAN, OPENAI_STD
    path = Path(pretrained)
    source = f"--clip-pretrained {pretrained}"
    if path.is_file() and is_torchscript(path):
        model = _load_into(_architecture(name, image_size), _read_torchscript(name, path), source, name)
    else:
        model = _create(name, pretrained)
        if tuple(model.visual.image_size) != (image_size, image_size):
            model = _load_into(_architecture(name, image_size), model.state_dict(), source, name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), tokenizer, preprocess.get("mean", OPENAI_MEAN), preprocess.get("std", OPENAI_STD)


class ClipMapEncoder(FrozenEncoder):
    """Frozen CLIP: `prepare` (CPU workers or the device) -> `feature_map`; `text_embeddings` of a vocabulary.

    `antialias`: whether the S x S resize antialiases. The official pipeline resized with the torchvision
    of its time, which did not antialias tensors (its demo calls F.interpolate, bilinear): the default.
    True changes the stored features and so the backbones fingerprint.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_size: int,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        precision: str = "fp32",
        antialias: bool = False,
    ):
        super().__init__(precision)
        self.antialias = bool(antialias)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        visual = model.visual
        if tuple(visual.image_size) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP built for {visual.image_size}, not {self.image_size}")
        self._mean, self._std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("mean", torch.tensor(self._mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._std).view(3, 1, 1), persistent=False)
        self.width = int(visual.conv1.out_channels)
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.num_tokens = 1 + (self.image_size // self.patch_size) ** 2
        self.embed_dim = int(visual.output_dim)
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        self.eval()

    def hot_modules(self) -> dict[str, nn.Module]:
        return {"CLIP's visual transformer": self.model.visual.transformer}

    def prepare(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Decoded RGB images (HxWx3 uint8 arrays, or uint8 [3, H, W] tensors on any device) -> CLIP's
        input float32 [B, 3, S, S] on this encoder's device: squashed to S x S (bilinear, antialiased
        only if `antialias`), normalised (`models.preprocess`)."""
        pixels = [as_chw(im).to(self.device, non_blocking=True) for im in images]
        return clip_input(pixels, self.image_size, self._mean, self._std, self.antialias)

    @torch.inference_mode()
    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] prepared images -> [B, L, C] float32 token map before ln_post (class token first)."""
        visual = self.model.visual
        with self._autocast():
            x = visual._embeds(images.to(self.device, torch.float32))  # (B, L, C) after ln_pre
            x = visual.transformer(x)  # (B, L, C)
        return x.float()

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] prepared images -> [B, D] L2-normalised embeddings (after ln_post and projection)."""
        with self._autocast():
            emb = self.model.encode_image(images.to(self.device, torch.float32)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embeddings(self, names: list[str], batch_names: int = 32) -> torch.Tensor:
        """Class names -> float32 [K, D] on the CPU: the mean of the 81 templates' raw embeddings,
        then L2-normalised."""
        templates = text_templates()
        out = []
        for start in range(0, len(names), batch_names):
            chunk = list(names[start : start + batch_names])
            tokens = self.tokenizer([t(name) for name in chunk for t in templates]).to(self.device)
            with self._autocast():
                emb = self.model.encode_text(tokens, normalize=False).float()  # (k * 81, D)
            emb = emb.view(len(chunk), len(templates), -1).mean(1)  # (k, D)
            out.append((emb / emb.norm(dim=-1, keepdim=True)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
