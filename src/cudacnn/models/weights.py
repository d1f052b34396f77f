"""Comparing a state_dict with a model's, for one clear message when weights do not fit."""

from __future__ import annotations

import torch


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
