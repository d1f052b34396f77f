"""Checkpoints: one dict saved atomically with torch.save, loaded with weights_only=True (never unpickles
code). Holds everything needed to rebuild the model and to resume training exactly."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cudacnn.atomic import atomic_output
from cudacnn.errors import CheckpointError
from cudacnn.models.weights import describe_mismatch

FORMAT = "cudacnn-checkpoint"
VERSION = 2  # model_kwargs name the net's shape, the model's defaults included (models/fast.py's `arch`)


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return path


def run_checkpoint(run_dir: str | Path) -> Path:
    """A run folder's best checkpoint, else its last."""
    for name in ("best.pt", "last.pt"):
        if (Path(run_dir) / "checkpoints" / name).exists():
            return Path(run_dir) / "checkpoints" / name
    raise CheckpointError(f"{run_dir} holds no checkpoints/best.pt or checkpoints/last.pt; "
                          "pass a checkpoint file or a run folder that finished an epoch")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = run_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file written by `cudacnn train`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]  # an empty file's error has no message
        raise CheckpointError(f"{path} is not a readable cudacnn checkpoint ({reason}); "
                              "it may be truncated, or not a weights-only file") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cudacnn checkpoint (no '{FORMAT}' marker); "
                              "for torchvision ImageNet weights use `--pretrained`")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version-{ckpt.get('version')} cudacnn checkpoint; this cudacnn reads "
                              f"version {VERSION}: train it again, or use the cudacnn that wrote it")
    return ckpt


def stored_model_kwargs(ckpt: dict) -> dict:
    """The keywords that rebuild the checkpoint's net."""
    return ckpt.get("model_kwargs", {})


def model_from_checkpoint(source: str | Path | dict, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, checkpoint dict)."""
    from cudacnn.models import create_model

    ckpt = source if isinstance(source, dict) else load_checkpoint(source)
    model = create_model(ckpt["model_name"], num_classes=len(ckpt["classes"]), **stored_model_kwargs(ckpt))
    check_compatible(model, ckpt["model"], f"checkpoint of model '{ckpt['model_name']}'")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def check_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise one clear CheckpointError when `state` does not fit `model` (other model, other head size)."""
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{what} does not fit this model: {mismatch}. "
                              "Use a checkpoint written for the same --model and number of classes")
