"""Lookahead as airbench uses it: every few steps the slow weights move toward the fast ones,
slow <- decay * slow + (1 - decay) * fast, and the fast weights restart from the slow ones.
decay 0 leaves training untouched; decay 1 resets the fast weights to the slow ones (airbench's last call)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, tensors):
        self.fast = list(tensors)
        self.slow = [t.detach().clone() for t in self.fast]

    @classmethod
    def of_model(cls, model: nn.Module) -> "Lookahead":
        """Track every floating-point parameter and buffer (BatchNorm statistics included)."""
        return cls(t for t in model.state_dict().values() if t.is_floating_point())

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.slow, self.fast, 1.0 - decay)
        torch._foreach_copy_(self.fast, self.slow)
