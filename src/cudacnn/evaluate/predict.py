"""Classify image files with a trained model: the images must be 32x32 RGB, like the training data
(resizing would silently change what the model sees, so we refuse instead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cudacnn.data.image_folder import decode_image
from cudacnn.errors import DataError


def read_image(path: str | Path) -> np.ndarray:
    """uint8 (32, 32, 3) HWC array of a 32x32 RGB image file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; predict takes image files: name them, e.g. {path}/*.png")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    decoded = decode_image((str(path), path.read_bytes()))  # the data loader's decoder: the same checks
    if isinstance(decoded, str):
        raise DataError(decoded)
    return decoded


def normalize(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, normalized the way the training loader does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: np.ndarray, mean, std) -> np.ndarray:
    """(N, K) softmax probabilities for uint8 (N, 32, 32, 3) images."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        logits = model(normalize(images, mean, std).to(param.device, param.dtype))
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()
