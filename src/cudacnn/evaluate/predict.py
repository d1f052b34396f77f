"""Classify image files with a trained model. Every image is brought to the model's input size exactly as the
training images were (the data loader's decoder: header size check, RGB conversion, shorter side resized and
the centre square cropped), so any image file of any size or mode can be given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cudacnn.data.image_folder import SIZE, decode_image
from cudacnn.errors import DataError


def image_size_of(ckpt: dict) -> int:
    """The input size a checkpoint's model was trained at (its run's --image-size; 32 before there was one)."""
    return int((ckpt.get("config") or {}).get("image_size") or SIZE)


def check_image_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; predict takes image files: name them, e.g. {path}/*.jpg")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    return path


def read_image(path: str | Path, size: int = SIZE) -> np.ndarray:
    """uint8 (size, size, 3) HWC array of an image file."""
    path = check_image_path(path)
    decoded = decode_image((str(path), path), size)  # the data loader's decoder: the same checks and resizing
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
    """(N, K) softmax probabilities for uint8 (N, S, S, 3) images."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        logits = model(normalize(images, mean, std).to(param.device, param.dtype))
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()
