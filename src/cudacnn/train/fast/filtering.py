"""Hard-example filtering: the main net trains on the hardest part of each batch only, ranked one of two ways.

- ProxyFilter (after airbench96): a small proxy net reads every batch (a forward pass) and learns from its
  own selection every few steps, so its ranking improves as training goes on.
- LastLossFilter: each example's own loss under the main net when it last trained on it. It costs no extra
  passes; the ranking is up to an epoch stale, and an example left out keeps its old (higher) loss, so it
  comes back once the others' losses have fallen below it.

Either way the main net spends its steps on the examples it has not yet mastered.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProxyFilter:
    def __init__(self, model: nn.Module, net: nn.Module, optimizers, keep: int, label_smoothing: float):
        self.model = model  # the proxy net
        self.net = net  # ... and what runs it (its compiled form, or the net itself)
        self.optimizers = optimizers
        self.keep = keep
        self.label_smoothing = label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, learn: bool):
        """The `keep` examples of the batch with the highest proxy loss, as (images, labels); with `learn`,
        the proxy also takes one optimizer step on that selection (its summed loss, as the main net's)."""
        with torch.set_grad_enabled(learn), torch.profiler.record_function("proxy_filter"):
            losses = F.cross_entropy(self.net(images), labels, label_smoothing=self.label_smoothing,
                                     reduction="none")
            hard = losses.detach().topk(self.keep, sorted=False).indices
            if learn:
                losses[hard].sum().backward()
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        return images[hard], labels[hard]


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
