"""ResNet-18 (He et al. 2016) with torchvision's module names, so torchvision-format ImageNet weights load
as they are. Two stems: "imagenet" (7x7 stride-2 conv + 3x3 max-pool, what the pretrained weights fit) and
"cifar" (3x3 stride-1 conv, no pool: keeps 32x32 inputs at full resolution in layer1)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.errors import CheckpointError, ConfigError
from cudacnn.models.registry import register_model
from cudacnn.models.weights import describe_mismatch, resolve_pretrained

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 10, stem: str = "cifar",
                 zero_init_residual: bool = False, input_size: int | None = None):
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"resnet stem must be one of {STEMS}, got {stem!r}")
        # Transfer recipes upsample CIFAR images, so the ImageNet stem's two stride-2 steps do not
        # shrink a 32x32 image to 8x8 before the first residual stage.
        self.input_size = input_size
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in, width, stride)] + [BasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        # torchvision's initialization, so from-scratch training matches the reference recipes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet18")
def resnet18(num_classes: int = 10, stem: str = "cifar", zero_init_residual: bool = False,
             input_size: int | None = None) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, stem, zero_init_residual, input_size)


HEAD_PREFIX = "fc."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt (weights-only torch.load) or .safetensors file; accepts the common
    wrappers ({'state_dict': ...}, {'model': ...}) and DataParallel's 'module.' prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {path} do not exist; pass --pretrained imagenet (downloads "
                              "torchvision's) or a local torchvision-format ResNet-18 file (e.g. resnet18-f37072fd.pth)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ModuleNotFoundError as exc:
            raise CheckpointError(f"{path} is a .safetensors file; `pip install safetensors` to read it, "
                                  "or pass the .pth file") from exc
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip/EOF errors all mean the same to the user
            raise CheckpointError(f"{path} is not a readable weights-only PyTorch file "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ImageNet weights (a file, or 'imagenet': see resolve_pretrained) into every layer but the head; the model keeps its own freshly initialized
    N-way `fc`. Raises CheckpointError naming a few keys when the body does not match."""
    path = resolve_pretrained(path)  # 'imagenet': torchvision's weights, downloaded once and verified
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(HEAD_PREFIX)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    # old torchvision files lack BN's num_batches_tracked counters; they carry no learned state
    mismatch = describe_mismatch(own, state, optional_suffixes=("num_batches_tracked",))
    if mismatch:
        stem_differs = "conv1.weight" in state and state["conv1.weight"].shape != own["conv1.weight"].shape
        hint = "; ImageNet weights fit stem='imagenet'" if stem_differs else ""
        raise CheckpointError(f"pretrained weights {path} do not fit this model: {mismatch}{hint}. "
                              "Pass torchvision-format ResNet-18 weights")
    model.load_state_dict(state, strict=False)
    return model
