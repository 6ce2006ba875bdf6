"""What the frozen encoders (`SamRegionEncoder`, `ClipMapEncoder`) share: always in eval mode, their
device, the precision they run in, `torch.compile` with a fallback, and the one-line reason a weights
file failed to load."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from regionspot.errors import RegionSpotError

# --precision of the backbones: the autocast dtype (None: plain float32). The official code runs CLIP
# with fp16 weights and SAM under fp16 autocast; here both run under autocast, which does the same
# matmuls in fp16 and keeps LayerNorm, softmax and the residual stream in float32.
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """The backbones' precision: as given, else fp16 on CUDA (as the official code) and fp32 on the CPU."""
    if precision is None:
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise RegionSpotError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


class FrozenEncoder(nn.Module):
    """A module wrapping frozen weights: `train()` is a no-op, `device` is where the weights are, and
    `_autocast()` runs the encoder in its `precision` (fp16, bf16: autocast; fp32: none) on any device."""

    def __init__(self, precision: str = "fp32"):
        super().__init__()
        self.precision = resolve_precision(precision, "cpu")

    def train(self, mode: bool = True):
        """Frozen: always in eval mode, whatever a caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def hot_modules(self) -> dict[str, nn.Module]:
        """The modules that do the bulk of the work, by name (what `use_compile` compiles)."""
        raise NotImplementedError

    def use_compile(self, **options) -> None:
        """--compile: run the hot modules through torch.compile(**options), each falling back on failure."""
        for name, module in self.hot_modules().items():
            compile_forward(module, name, **options)


class CompiledForward:
    """A module's forward through `torch.compile`; if compiling (or running the compiled code) fails,
    one warning and the module's own forward from then on.

    Installed as the instance's `forward` attribute (`compile_forward`), so the module, its state dict
    and its weight hash stay as they were.
    """

    def __init__(self, module: nn.Module, name: str, **options):
        self.eager = module.forward
        self.name = name
        try:
            self.compiled = torch.compile(self.eager, **options)
        except Exception as e:  # e.g. a Python version dynamo does not support
            self._fall_back(e)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # compilation happens at the first call: no compiler, unsupported op
                out = self.eager(*args, **kwargs)  # raises when the inputs are at fault, not the compiler
                self._fall_back(e)
                return out
        return self.eager(*args, **kwargs)

    def _fall_back(self, e: Exception) -> None:
        self.compiled = None
        warnings.warn(
            f"--compile: torch.compile failed for {self.name} ({type(e).__name__}: {first_line(e)}); "
            "running it uncompiled",
            RuntimeWarning,
            stacklevel=3,
        )


def compile_forward(module: nn.Module, name: str, **options) -> None:
    """Run `module` (this instance) through torch.compile(**options), falling back as CompiledForward says."""
    if not isinstance(module.forward, CompiledForward):
        module.forward = CompiledForward(module, name, **options)


def first_line(e: Exception, limit: int = 200) -> str:
    """The informative line of an exception (a state-dict error's first mismatch), shortened."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
