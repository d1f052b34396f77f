"""Muon (MomentUm Orthogonalized by Newton-Schulz) for conv filters, as in airbench94_muon: SGD-Nesterov
momentum whose update is replaced by the nearest semi-orthogonal matrix, found by a quintic
Newton-Schulz iteration in bf16. The filters are renormalized each step (BatchNorm follows every conv,
so only their direction matters) and the orthogonal update sets the step size.

All filter banks are orthogonalized together, as the Hiverge record does: each update matrix is zero-padded
to the largest one and the iteration runs on the stack, a few batched matmuls a step instead of a few per
filter bank (at fast94's 200 steps of ~6 ms, per-bank launches cost more than the arithmetic)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Quintic coefficients (Keller Jordan's) chosen for speed over exactness: 5 steps move singular values that
# are not tiny into about [0.7, 1.2], which serves an optimizer as well as exact orthogonalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, i.e. G with its singular values set to ~1; G is a matrix or a
    stack of them (each normalized on its own). Runs in bf16 on GPUs (the iteration tolerates it), float32
    elsewhere (CPUs have slow bf16 matmuls)."""
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so singular values start in (0, 1]
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def newton_schulz_stacked(mats: list[torch.Tensor], steps: int = 5) -> list[torch.Tensor]:
    """newton_schulz of each 2-D matrix in `mats`, in one batched iteration. Each is turned wide and zero-padded
    to the largest rows x columns: zero rows and columns stay zero through the iteration and leave the
    matrix's own block unchanged, so the result is the per-matrix one."""
    wide = [m.mT if m.size(0) > m.size(1) else m for m in mats]
    rows, cols = max(m.size(0) for m in wide), max(m.size(1) for m in wide)
    stack = torch.stack([F.pad(m, (0, cols - m.size(1), 0, rows - m.size(0))) for m in wide])
    out = newton_schulz(stack, steps)
    blocks = [o[: w.size(0), : w.size(1)] for o, w in zip(out, wide)]
    return [blk.mT if m.size(0) > m.size(1) else blk for blk, m in zip(blocks, mats)]


def muon_updates(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                 momentum: float, nesterov: bool, ns_steps: int) -> list[torch.Tensor]:
    """Advance the momentum buffers, renormalize each filter bank in place (unit RMS row norm), return the
    orthogonalized updates (in each parameter's dtype)."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    steps = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    norms = torch._foreach_norm(params)
    torch._foreach_mul_(params, [len(p) ** 0.5 / n for p, n in zip(params, norms)])
    updates = newton_schulz_stacked([s.reshape(len(s), -1) for s in steps], ns_steps)
    return [u.reshape(p.shape).to(p.dtype) for u, p in zip(updates, params)]


def muon_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lr: torch.Tensor,
              momentum: float, nesterov: bool, ns_steps: int) -> None:
    """muon_updates, then the parameters move by -lr times their update; lr is a device tensor, so a CUDA graph
    of this step serves every step of the schedule."""
    updates = muon_updates(params, grads, bufs, momentum, nesterov, ns_steps)
    torch._foreach_add_(params, torch._foreach_mul(updates, -lr))


class GraphedStep:
    """Muon's whole step on fixed parameters, captured once as a CUDA graph: three launches a step (copy the
    gradients in, set the lr, replay) instead of the compiled update's ~30 kernels launched from Python
    (fast94: 0.987x the time a run). The momentum buffers, gradient copies and lr live at fixed addresses;
    `reset` zeroes the buffers for a new run on the same parameters, which it keeps alive."""

    def __init__(self, params: list[torch.Tensor], momentum: float, nesterov: bool, ns_steps: int):
        self.params = params
        self.grads = [torch.zeros_like(p) for p in params]
        self.bufs = [torch.zeros_like(p) for p in params]
        self.lr = torch.zeros((), device=params[0].device)
        step = torch.compile(muon_step, dynamic=False, fullgraph=True)
        args = (params, self.grads, self.bufs, self.lr, momentum, nesterov, ns_steps)
        # compile and warm up outside the capture, on a side stream as capture wants; zero gradients and lr
        # leave the buffers at zero and the parameters only renormalized, which the first real step does anyway
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(*args)

    def reset(self) -> None:
        torch._foreach_zero_(self.bufs)

    def __call__(self, grads: list[torch.Tensor], lr: float) -> None:
        torch._foreach_copy_(self.grads, grads)
        self.lr.fill_(lr)
        self.graph.replay()


_GRAPHED: dict[tuple, GraphedStep] = {}  # one per set of parameters (by address and shape) and step constants


def allow_static_graphs(count: int = 64) -> None:
    """Let one function compile up to `count` shape-specialised graphs (dynamo's default limit is 8)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)


class Muon(torch.optim.Optimizer):
    """`compiled=True` runs the whole update of all filter banks as one compiled graph (a few fused kernels and
    batched matmuls); the learning rate stays outside it, so its schedule does not recompile. `graphed=True`
    (CUDA only) replays the compiled step, parameter update included, as one CUDA graph (GraphedStep)."""

    def __init__(self, params, lr: float = 0.24, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 5, compiled: bool = False, graphed: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        if compiled or graphed:  # one graph per preset's set of filter shapes
            allow_static_graphs()
        self.updates = torch.compile(muon_updates, dynamic=False, fullgraph=True) if compiled else muon_updates
        self.graphed = graphed
        self.graphs: dict[int, GraphedStep] = {}  # per param group, from its first step (not in state_dict)

    def graphed_step(self, group: dict, params: list[torch.Tensor]) -> GraphedStep:
        """The cached graph of these parameters' step, its momentum zeroed (a new run), else a new capture."""
        key = (tuple((p.data_ptr(), p.shape, p.dtype) for p in params), group["momentum"], group["nesterov"],
               group["ns_steps"])
        if key in _GRAPHED:
            graphed = _GRAPHED[key]
            graphed.reset()
        else:
            graphed = _GRAPHED[key] = GraphedStep(params, group["momentum"], group["nesterov"], group["ns_steps"])
        for p, buf in zip(params, graphed.bufs):
            self.state[p]["momentum_buffer"] = buf
        return graphed

    @torch.no_grad()
    def step(self, closure=None):
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.graphed:
                if i not in self.graphs:
                    self.graphs[i] = self.graphed_step(group, params)
                self.graphs[i]([p.grad for p in params], group["lr"])
                continue
            bufs = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(self.state[p]["momentum_buffer"])
            updates = self.updates(params, [p.grad for p in params], bufs, group["momentum"], group["nesterov"],
                                   group["ns_steps"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])
