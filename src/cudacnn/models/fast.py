"""The record-speed CIFAR nets (after airbench, arXiv 2404.00498), written for cudacnn.

fast94: a 2x2 patch-whitening conv (frozen weights set from data), then three conv groups of widths
64/256/256, each conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU, a global max pool and a linear head.
fast96: widths 128/512/512 (airbench96's) and a third conv per group, with a residual connection around the
last two that is added before the last GELU (as airbench96's later record version: 0.06-0.11 points above
adding it after the GELU, as the PyPI airbench96 does).
BatchNorm scales are frozen at 1 (only the biases learn); convs start as identities on their first
channels (dirac init), so the deep net starts close to a shallow one. The conv groups' activation is GELU or
SiLU (the Hiverge record's choice); the whitening layer's is GELU in both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.models.registry import register_model


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale and a learnable bias. airbench's momentum 0.6 is in the
    opposite convention from PyTorch's, hence 1 - 0.6."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])  # identity on the first cin outputs


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}
HEAD_INITS = ("unit_std", "torch")


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """The max over each channel's whole map, as one max_pool2d window: its backward scatters through saved
    indices (adaptive_max_pool2d's backward uses atomics and took 4% of a fast94 step). Not x.amax((2, 3)):
    compiled in fp16, Inductor recomputes amax's input at another precision, its equality mask can miss every
    max, and the gradients turn NaN (pytorch#186799)."""
    return F.max_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)


class ConvGroup(nn.Module):
    """conv -> pool -> BN -> act, then depth-1 more conv -> BN -> act; from depth 3 on, a residual
    connection adds the group's first activation to the last activation's input."""

    def __init__(self, cin: int, cout: int, depth: int = 2, bn_momentum: float = 0.4, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.residual = depth >= 3
        self.convs = nn.ModuleList([Conv(cin, cout)] + [Conv(cout, cout) for _ in range(depth - 1)])
        self.norms = nn.ModuleList([BatchNorm(cout, bn_momentum) for _ in range(depth)])

    def norm_act(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(norm(x) + residual). A norm with this group's `activation` (kernels.BatchNormAct, put in by
        kernels.swap_modules) applies the add and the activation itself, in one fused kernel."""
        if getattr(norm, "activation", None) == self.activation:
            return norm(x, residual)
        x = norm(x)
        return ACTIVATIONS[self.activation](x if residual is None else x + residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        if getattr(self.norms[0], "pools_input", False):  # kernels.PoolBatchNormAct: pool, BN and act in one op
            x = self.norms[0](x)
        else:
            x = self.norm_act(self.norms[0], F.max_pool2d(x, 2))
        first = x
        for conv, norm in zip(self.convs[1:-1], self.norms[1:-1]):
            x = self.norm_act(norm, conv(x))
        return self.norm_act(self.norms[-1], self.convs[-1](x), first if self.residual else None)


class FastNet(nn.Module):
    def __init__(self, widths=(64, 256, 256), depth: int = 2, num_classes: int = 10,
                 whiten_kernel: int = 2, bn_momentum: float = 0.4, logit_scale: float | None = None,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        # the keywords that rebuild this net, stored with its runs and checkpoints (a list: it goes into YAML)
        self.arch = dict(widths=list(widths), activation=activation)
        whiten_width = 2 * 3 * whiten_kernel**2  # each eigen-direction and its negation
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        chans = [whiten_width, *widths]
        self.groups = nn.Sequential(*[ConvGroup(chans[i], chans[i + 1], depth, bn_momentum, activation)
                                      for i in range(len(widths))])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        # 1/width keeps the first logits tiny, matching the head lr tuned for a summed loss (airbench94_muon)
        self.logit_scale = logit_scale if logit_scale is not None else 1 / widths[-1]
        self.reset()

    def use_pool_kernel(self, backend: str = "triton") -> "FastNet":
        """Run each group's first pool -> BatchNorm -> activation as one fused op (kernels.PoolBatchNormAct,
        kernels/pool_bn_act.py) instead of F.max_pool2d, the BatchNorm and the activation; backend "torch" puts
        the plain modules back. The BatchNorms' parameters and buffers are shared, so the state_dict keys and
        an optimizer built before stay valid. Returns the net."""
        from cudacnn.kernels import PoolBatchNormAct
        from cudacnn.kernels.modules import share_batchnorm
        from cudacnn.kernels.ops import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"pool_kernel must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for group in self.groups:
            norm = group.norms[0]
            if backend == "torch":
                if isinstance(norm, PoolBatchNormAct):
                    group.norms[0] = share_batchnorm(BatchNorm, norm)
            else:
                group.norms[0] = PoolBatchNormAct.from_torch(norm, group.activation, backend)
        return self

    def forward(self, x: torch.Tensor, whiten_bias_grad: bool = True) -> torch.Tensor:
        """`whiten_bias_grad=False` once the whitening bias has stopped learning: with it detached nothing
        before the first group needs a gradient, and backward skips that conv's input gradient and the
        whitening GELU's (a compiled step keeps one graph for each value)."""
        bias = self.whiten.bias if whiten_bias_grad else self.whiten.bias.detach()
        x = F.gelu(F.conv2d(x, self.whiten.weight, bias))
        x = self.groups(x)
        return self.head(global_max_pool(x)) * self.logit_scale

    @torch.no_grad()
    def reset(self, head_init: str = "unit_std") -> None:
        """Fresh weights and BatchNorm statistics in place, so a compiled copy can be reused across runs.
        head_init "unit_std" scales the head to unit standard deviation (as airbench94_muon and the Hiverge
        record), about 28x nn.Linear's default ("torch") at 256 inputs: with the default, the gradient
        reaching the convs and biases is as much smaller in the first steps, the very steps the whitening
        bias learns in. fast94 measured 0.30 points higher with it (12 runs each, benchmarks/fast.md)."""
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.weight.fill_(1.0)
                m.bias.zero_()
        if head_init == "unit_std":
            self.head.weight.div_(self.head.weight.float().std().to(self.head.weight.dtype))

    @torch.no_grad()
    def init_whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten the k x k patches of `images` (normalized NCHW)."""
        from cudacnn.train.fast.whitening import whitening_filters

        weight = whitening_filters(images, self.whiten.kernel_size[0], eps)
        self.whiten.weight.copy_(torch.cat([weight, -weight]).to(self.whiten.weight.dtype))

    def to_training_dtype(self, dtype: torch.dtype) -> "FastNet":
        """Convs and head in `dtype` (fp16 on GPU); BatchNorm stays float32 for its statistics."""
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.float()
        return self


@register_model("fast94")
def fast94(num_classes: int = 10, widths=(64, 256, 256), **kw) -> nn.Module:
    return FastNet(widths=widths, depth=2, num_classes=num_classes, **kw)


@register_model("fast96")
def fast96(num_classes: int = 10, widths=(128, 512, 512), **kw) -> nn.Module:
    return FastNet(widths=widths, depth=3, num_classes=num_classes, **kw)
