"""On-device augmentation of uint8 NCHW batches. Every function takes a torch.Generator so an epoch is
reproducible from a seed, and works the same on CPU and CUDA tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, pad: int, gen: torch.Generator, mode: str = "reflect") -> torch.Tensor:
    """Pad by `pad` pixels and take a random 32x32 window per image (pad=0 leaves images unchanged)."""
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    padded = pad_images(images, pad, mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=gen)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, h) source rows of each image
    cols = dx[:, None] + torch.arange(w, device=images.device)
    # Two gathers with broadcast (stride-0) indices: no index tensor as large as the images.
    c, padded_w = images.shape[1], padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded_w))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def pad_images(images: torch.Tensor, pad: int, mode: str = "reflect") -> torch.Tensor:
    """Pad H and W by `pad` ('reflect' or 'constant' zeros). F.pad's reflect mode has no uint8 kernel,
    so the reflection is an index_select."""
    if mode == "constant":
        return F.pad(images, (pad, pad, pad, pad))
    h, w = images.shape[-2:]
    rows = _reflect_index(h, pad, images.device)
    cols = _reflect_index(w, pad, images.device)
    return images.index_select(2, rows).index_select(3, cols)


def _reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


def random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    mask = torch.rand(images.shape[0], device=images.device, generator=gen) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def alternating_flip(images: torch.Tensor, base_mask: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's flip: a fixed random half is mirrored on even epochs, the other half on odd ones,
    so every image is seen both ways within two epochs."""
    mask = base_mask if epoch % 2 == 0 else ~base_mask
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def cutout(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred anywhere (it may hang over the border)."""
    if size <= 0:
        return images
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n,), device=images.device, generator=gen)[:, None, None]
    cx = torch.randint(0, w, (n,), device=images.device, generator=gen)[:, None, None]
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    top, left = cy - size // 2, cx - size // 2
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside[:, None], 0)


def color_jitter_factors(n: int, brightness: float, contrast: float, gen: torch.Generator,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per image, shape (n, 1, 1, 1): a brightness shift drawn from [-brightness, brightness] and a contrast
    factor drawn from [1 - contrast, 1 + contrast], as the Hiverge record draws them; None when both are off."""
    if brightness <= 0 and contrast <= 0:
        return None
    shift = (torch.rand(n, 1, 1, 1, device=device, generator=gen) * 2 - 1) * brightness
    scale = (torch.rand(n, 1, 1, 1, device=device, generator=gen) * 2 - 1) * contrast + 1
    return shift, scale


def color_jitter(images: torch.Tensor, brightness: float, contrast: float, gen: torch.Generator) -> torch.Tensor:
    """Shift each normalized float image's brightness, then scale its contrast (color_jitter_factors): the shift
    is in units of the data set's standard deviation and the contrast scales about its mean. The loader folds
    the same factors into its normalization instead (GpuLoader.normalize)."""
    factors = color_jitter_factors(images.shape[0], brightness, contrast, gen, images.device)
    if factors is None:
        return images
    shift, scale = factors
    return (images + shift) * scale
