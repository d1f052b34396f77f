"""Hard-example filtering (after airbench96): a small proxy net ranks each batch by its loss, and the main
net trains on the hardest part only.

The proxy reads every batch (a forward pass) and learns from its own selection every few steps, so its
ranking improves as training goes on; the main net spends its steps on the examples it has not yet mastered.
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
