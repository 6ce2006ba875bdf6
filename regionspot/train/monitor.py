"""What the training loop keeps on the device between read-backs: the loss sum, and the non-finite guard.

No step waits for the device: the loss is added to a device tensor, a non-finite step sets a device
flag that makes AdamW skip its update (on the device, as AMP's loss scaler does), and the host reads
both back only at log and save steps. Since the flag stays set once set, the weights and optimiser
state found at that read are those before the first bad step; a host-side ring of the recent steps
(step, image keys, RNG state, loss tensor) names that step's images and gives the RNG state to save
with them. The ring holds `recent` steps: the most that pass between two read-backs.

With several ranks the flag agrees everywhere without a collective per step: a rank whose loss is not
finite makes its gradient NaN, DDP's all-reduce carries the NaN to every rank, and every rank sets
the flag from the norm of the same reduced gradient.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from regionspot.train.distributed import Dist
from regionspot.train.state import rng_state


@dataclass
class RecentStep:
    step: int
    keys: list[str]
    rng: dict  # the RNG state before the step (what a checkpoint of the state before it stores)
    loss: torch.Tensor | None = None  # a device scalar, read only when the run stops


class StepMonitor:
    def __init__(self, device: torch.device, recent: int):
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0  # steps in loss_sum
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.recent: deque[RecentStep] = deque(maxlen=recent)

    def begin(self, step: int, keys: list[str]) -> None:
        """Record a step before its forward pass (its RNG state is the one a restart would need)."""
        self.recent.append(RecentStep(step, list(keys), rng_state()))

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Count the step's loss; the loss to call backward on: itself when finite, else one whose
        gradient is NaN everywhere (a non-finite loss need not make every gradient non-finite)."""
        value = loss.detach()
        self.recent[-1].loss = value
        self.loss_sum += value
        self.count += 1
        return loss * torch.where(torch.isfinite(value), 1.0, math.nan)

    def found_inf(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Update the flag from the step's (all-reduced) gradient norm; returns it as fused AdamW's
        `found_inf` (1.0: skip the update)."""
        now = ~torch.isfinite(grad_norm)
        self.first_bad = torch.where(now & ~self.bad, self.recent[-1].step, self.first_bad)
        self.bad |= now
        return self.bad.float()

    def read(self, env: Dist, reset: bool) -> tuple[float, bool]:
        """(the mean loss of all ranks' steps since the last reset, whether a step was not finite on any
        rank): one all-reduce and one host sync. `reset` starts the next mean."""
        loss_sum, bad = env.all_sum(torch.stack([self.loss_sum, self.bad.float()])).tolist()
        mean = loss_sum / max(self.count * env.world, 1)
        if reset:
            self.loss_sum.zero_()
            self.count = 0
        return mean, bad > 0

    def report(self) -> tuple[int | None, list[tuple[int, list[str], float]]]:
        """(this rank's first non-finite step or None, (step, keys, loss) of the recent steps), plain data."""
        first = int(self.first_bad) if bool(self.bad) else None
        steps = [(r.step, r.keys, float(r.loss) if r.loss is not None else math.nan) for r in self.recent]
        return first, steps

    def rng_before(self, step: int) -> dict:
        return next(r.rng for r in self.recent if r.step == step)
