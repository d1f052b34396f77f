"""Test-time augmentation: average a model's logits over cheap views of each image (airbench's scheme).

level 0: the image itself.
level 1: the image and its horizontal mirror, averaged.
level 2: level 1 on the image (weight 1/2) plus level 1 on the image shifted one pixel up-left and one
         pixel down-right (weight 1/4 each; the shifts read a 1-pixel reflect padding).
level 3: level 2 with all four 1-pixel diagonal shifts (up-left, down-right, up-right, down-left; weight 1/8
         each): 10 forward passes instead of 6.
predict_tta's `fraction` < 1 spends the views only where they can matter (the Hiverge record's scheme): one
plain pass over every image, then the level's views for the least confident `fraction` of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TTA_LEVELS = (0, 1, 2, 3)
TTA_VIEWS = {0: 1, 1: 2, 2: 6, 3: 10}  # forward passes per image at each level


def mirror_average(model, images: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(images) + model(images.flip(-1)))


def shifted_views(images: torch.Tensor, count: int = 2) -> list[torch.Tensor]:
    """1-pixel diagonal translations of NCHW images: up-left and down-right, then (count 4) up-right and
    down-left."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    offsets = [(0, 0), (2, 2), (0, 2), (2, 0)][:count]
    return [padded[..., dy:dy + h, dx:dx + w] for dy, dx in offsets]


def tta_logits(model, images: torch.Tensor, level: int) -> torch.Tensor:
    """Averaged logits of one batch under TTA `level` (0 to 3)."""
    if level == 0:
        return model(images)
    if level == 1:
        return mirror_average(model, images)
    if level in (2, 3):
        views = shifted_views(images, count=2 if level == 2 else 4)
        shifted = sum(mirror_average(model, view) for view in views) / len(views)
        return 0.5 * mirror_average(model, images) + 0.5 * shifted
    raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level!r}")


@torch.no_grad()
def predict_tta(model, images: torch.Tensor, level: int = 0, batch_size: int = 2000,
                fraction: float = 1.0) -> torch.Tensor:
    """Logits (float32, N x classes) for normalized NCHW `images`, evaluated in batches of `batch_size`;
    with `fraction` < 1, TTA logits for only the least confident fraction of images and plain logits for
    the rest. The caller puts the model in eval mode; nothing here synchronizes with the host."""
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"TTA fraction must be in (0, 1], got {fraction!r}")

    def batched(x: torch.Tensor, level: int) -> torch.Tensor:
        return torch.cat([tta_logits(model, x[i:i + batch_size], level).float()
                          for i in range(0, len(x), batch_size)])

    if fraction == 1 or level == 0:
        return batched(images, level)
    logits = batched(images, 0)
    confidence = logits.softmax(1).amax(1)
    unsure = confidence.topk(max(1, round(fraction * len(images))), largest=False, sorted=False).indices
    logits[unsure] = batched(images[unsure], level)
    return logits
