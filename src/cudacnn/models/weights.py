"""Comparing a state_dict with a model's, for one clear message when weights do not fit; the published
pretrained weights `--pretrained NAME` downloads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cudacnn.download import Published, digests_of, download


def describe_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                      optional_suffixes: tuple[str, ...] = ()) -> str:
    """'' when `state` fits `own`; else what differs, with a few keys as examples. Keys of `own` ending in
    one of `optional_suffixes` may be absent from `state`."""
    missing = [k for k in own if k not in state and not k.endswith(optional_suffixes)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
    return "; ".join(parts)


# torchvision's ImageNet ResNet-18 (IMAGENET1K_V1), at its official address. As torchvision does, the file name
# carries the first 8 hex digits of the file's SHA-256, and a download must match them.
IMAGENET_RESNET18 = Published("resnet18-imagenet", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                              "resnet18-f37072fd.pth", sha256_prefix="f37072fd", flag="--pretrained",
                              folder_env="CUDACNN_WEIGHTS_DIR")
PRETRAINED = {"imagenet": IMAGENET_RESNET18}


def weights_dir() -> Path:
    return Path(os.environ.get("CUDACNN_WEIGHTS_DIR") or Path.home() / ".cache" / "cudacnn" / "weights")


def resolve_pretrained(spec: str | Path, quiet: bool = False) -> Path:
    """A local weights file for --pretrained: a name in PRETRAINED is downloaded once into weights_dir() (or
    taken from torch hub's cache, where torchvision may have put it already) and its checksum verified; any
    other value is a path."""
    if str(spec) not in PRETRAINED:
        return Path(spec).expanduser()
    published = PRETRAINED[str(spec)]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / published.filename
    if hub.is_file() and published.check(digests_of(hub)) is None:
        return hub
    return download(published, weights_dir(), quiet=quiet)
