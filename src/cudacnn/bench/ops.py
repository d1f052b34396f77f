"""`cudacnn bench ops`: the building blocks on each device. A 1024^2 fp32 matrix product, every distinct
conv layer of the zoo's models (shapes found by hooking a forward pass), and ResNet-18 forward and
forward+backward at batch 128 on 32x32 inputs. All fp32, NCHW, PyTorch defaults otherwise (cuDNN may
use TF32 for convs on the GPU: the environment records whether it was allowed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.bench.harness import time_fn
from cudacnn.bench.report import measurement, result_row

log = logging.getLogger(__name__)
ZOO = ("simple", "bn_dropout", "smallnet", "resnet18")


@dataclass(frozen=True)
class ConvShape:
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    height: int
    width: int

    @property
    def name(self) -> str:
        k, s, p = self.kernel, self.stride, self.padding
        kk = f"{k[0]}" if k[0] == k[1] else f"{k[0]}x{k[1]}"
        return f"conv {self.c_in}->{self.c_out} k{kk} s{s[0]} p{p[0]} @{self.height}x{self.width}"

    def flops(self, batch: int) -> float:
        h_out = (self.height + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
        w_out = (self.width + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1
        return 2.0 * batch * self.c_out * h_out * w_out * self.c_in * self.kernel[0] * self.kernel[1] / self.groups


def build_zoo_model(name: str) -> nn.Module:
    from cudacnn.models import create_model

    return create_model(name, stem="cifar") if name == "resnet18" else create_model(name)


def conv_shapes(model: nn.Module, image_size: int = 32) -> list[ConvShape]:
    """The conv layers a forward pass on 3 x image_size x image_size inputs goes through, in order."""
    found: list[ConvShape] = []

    def record(module: nn.Conv2d, inputs):
        h, w = inputs[0].shape[-2:]
        found.append(ConvShape(module.in_channels, module.out_channels, tuple(module.kernel_size),
                               tuple(module.stride), tuple(module.padding), module.groups,
                               module.bias is not None, int(h), int(w)))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def zoo_conv_shapes(models: list[str]) -> dict[ConvShape, list[str]]:
    """Distinct conv shapes across `models`, each with the models that use it."""
    shapes: dict[ConvShape, list[str]] = {}
    for name in models:
        for shape in conv_shapes(build_zoo_model(name)):
            users = shapes.setdefault(shape, [])
            if name not in users:
                users.append(name)
    return shapes


def _measure(cases, devices, warmup, repeats, budget_s) -> dict[str, dict]:
    """Time `cases[device]()` (a zero-argument callable made on that device) on every device."""
    out = {}
    for device in devices:
        fn = cases(torch.device(device))
        out[device] = measurement(time_fn(fn, device, warmup=warmup, repeats=repeats, budget_s=budget_s))
        del fn
    return out


def matmul_case(size: int):
    def make(device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(device)
        b = torch.randn(size, size, generator=gen).to(device)
        return lambda: a @ b
    return make


def conv_case(shape: ConvShape, batch: int):
    def make(device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, shape.c_in, shape.height, shape.width, generator=gen).to(device)
        w = (torch.randn(shape.c_out, shape.c_in // shape.groups, *shape.kernel, generator=gen) * 0.05).to(device)
        b = torch.randn(shape.c_out, generator=gen).to(device) if shape.bias else None
        return lambda: F.conv2d(x, w, b, shape.stride, shape.padding, 1, shape.groups)
    return make


def resnet_case(batch: int, backward: bool, image_size: int = 32):
    def make(device):
        torch.manual_seed(0)
        model = build_zoo_model("resnet18").to(device)
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        if not backward:
            model.eval()

            def forward():
                with torch.no_grad():
                    return model(x)
            return forward
        model.train()

        def forward_backward():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return forward_backward
    return make


def run(devices: list[str], models: list[str] = list(ZOO), batch: int = 128, matmul_size: int = 1024,
        warmup: int = 2, repeats: int = 10, budget_s: float = 5.0, resnet: bool = True) -> list[dict]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # pick the best conv algorithm per shape, as training would
    try:
        return _run(devices, models, batch, matmul_size, warmup, repeats, budget_s, resnet)
    finally:
        torch.backends.cudnn.benchmark = previous


def _run(devices, models, batch, matmul_size, warmup, repeats, budget_s, resnet) -> list[dict]:
    rows = []

    def add(name, group, make, flop, **info):
        log.info("  %s", name)
        m = _measure(make, devices, warmup, repeats, budget_s)
        for label, meas in m.items():
            meas["gflops"] = round(flop / (meas["median_ms"] * 1e6), 2)
        rows.append(result_row(name, group, m, gflop=round(flop / 1e9, 3), **info))

    n = matmul_size
    add(f"matmul {n}x{n} fp32", "matmul", matmul_case(n), 2.0 * n ** 3)
    for shape, users in zoo_conv_shapes(models).items():
        add(shape.name, f"conv layers of the zoo, forward, batch {batch}", conv_case(shape, batch),
            shape.flops(batch), models=",".join(users))
    if resnet:
        fwd_flop = sum(s.flops(batch) for s in conv_shapes(build_zoo_model("resnet18")))
        add(f"resnet18 forward, batch {batch}", "resnet18 (cifar stem), 32x32", resnet_case(batch, False),
            fwd_flop, note="conv FLOPs only")
        add(f"resnet18 forward+backward, batch {batch}", "resnet18 (cifar stem), 32x32", resnet_case(batch, True),
            3 * fwd_flop, note="conv FLOPs only, backward counted as 2x forward")
    return rows
