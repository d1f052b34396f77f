"""Muon (MomentUm Orthogonalized by Newton-Schulz) for conv filters, as in airbench94_muon: SGD-Nesterov
momentum whose update is replaced by the nearest semi-orthogonal matrix, found by a quintic
Newton-Schulz iteration in bf16. The filters are renormalized each step (BatchNorm follows every conv,
so only their direction matters) and the orthogonal update sets the step size."""

from __future__ import annotations

import torch

# Quintic coefficients (Keller Jordan's) chosen for speed over exactness: 5 steps move singular values that
# are not tiny into about [0.7, 1.2], which serves an optimizer as well as exact orthogonalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (a 2-D matrix), i.e. G with its singular values set to ~1.
    Runs in bf16 on GPUs (the iteration tolerates it), float32 elsewhere (CPUs have slow bf16 matmuls)."""
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm, so singular values start in (0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_update(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool,
                ns_steps: int) -> torch.Tensor:
    """Advance the momentum `buf`, renormalize the filter bank `p` in place, return the orthogonalized
    update (in p's dtype)."""
    buf.mul_(momentum).add_(grad)
    g = grad.add(buf, alpha=momentum) if nesterov else buf
    p.mul_(len(p) ** 0.5 / p.norm())  # keep each filter bank at unit RMS row norm
    return newton_schulz(g.reshape(len(g), -1), ns_steps).view_as(p).to(p.dtype)


def allow_static_graphs(count: int = 64) -> None:
    """Let one function compile up to `count` shape-specialised graphs (dynamo's default limit is 8)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)


class Muon(torch.optim.Optimizer):
    """`compiled=True` runs each filter bank's update as one compiled graph (a few fused kernels instead
    of about 40 eager ones); the learning rate stays outside it, so its schedule does not recompile."""

    def __init__(self, params, lr: float = 0.24, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 5, compiled: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        if compiled:  # one graph per filter shape: fast96 and a filtering proxy have more than dynamo's default 8
            allow_static_graphs()
        self.update = torch.compile(muon_update, dynamic=False, fullgraph=True) if compiled else muon_update

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                update = self.update(p, p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                p.add_(update, alpha=-group["lr"])
