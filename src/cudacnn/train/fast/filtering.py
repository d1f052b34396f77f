"""Hard-example filtering by each example's last loss: the main net trains on the part of each batch whose
loss was highest when it last trained on those examples.

It costs no extra passes (airbench96 ranks with a second, proxy net instead); the ranking is up to an epoch
stale, and an example left out keeps its old (higher) loss, so it comes back once the others' losses have
fallen below it. Either way the net spends its steps on the examples it has not yet mastered.
"""

from __future__ import annotations

import torch


class LastLossFilter:
    def __init__(self, num_examples: int, keep: int, device):
        # never seen ranks first: the first epoch keeps an arbitrary `keep` of each batch, the second the rest
        self.last_loss = torch.full((num_examples,), float("inf"), device=device)
        self.keep = keep

    def select(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in the batch of the `keep` examples (dataset `indices`) with the highest last loss."""
        return self.last_loss[indices].topk(self.keep, sorted=False).indices

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        self.last_loss[indices] = losses.detach().float()
