"""What the frozen encoders (`SamRegionEncoder`, `ClipMapEncoder`) share: always in eval mode, their
device, the autocast they run under, and the one-line reason a weights file failed to load."""

from __future__ import annotations

import torch
from torch import nn


class FrozenEncoder(nn.Module):
    """A module wrapping frozen weights: `train()` is a no-op, `device` is where the weights are, and
    `_autocast()` applies `autocast_dtype` on CUDA only (on the CPU the encoders run in float32)."""

    def __init__(self, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.autocast_dtype = autocast_dtype

    def train(self, mode: bool = True):
        """Frozen: always in eval mode, whatever a caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)


def first_line(e: Exception, limit: int = 200) -> str:
    """The informative line of an exception (a state-dict error's first mismatch), shortened."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
