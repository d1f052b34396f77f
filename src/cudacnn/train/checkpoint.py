"""Checkpoints: one dict, serialized with torch.save and written atomically behind a header that carries the
payload's size and SHA-256, so every load verifies the bytes before torch.load (weights_only=True: it never
unpickles code) reads them. A flipped or missing byte is refused with one line instead of resuming to other
weights. The dict holds everything needed to rebuild the model and to resume training exactly.

File layout: MAGIC, one JSON line {"container": 1, "size": N, "sha256": HEX}, then N bytes of torch.save.
A plain torch.save file (what cudacnn wrote before the header existed) cannot be verified and is refused."""

from __future__ import annotations

import hashlib
import io
import json
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
MAGIC = b"cudacnn-checkpoint\n"
CONTAINER = 1  # the header's layout
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's own format: no header, so nothing to verify

# what every checkpoint holds, and what the resume state holds besides (Trainer._state)
REQUIRED = {"model_name": str, "classes": list, "mean": (list, tuple), "std": (list, tuple), "model": dict,
            "epoch": int}
TRAIN_STATE = ("model", "optimizer", "scheduler", "scaler", "ema", "early_stopping", "rng", "history")


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash or a full disk never leaves half a
    checkpoint, and the previous one stays."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    payload = buffer.getbuffer()
    header = json.dumps({"container": CONTAINER, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header)
            f.write(payload)
    return path


def run_checkpoint(run_dir: str | Path) -> Path:
    """A run folder's best checkpoint, else its last."""
    for name in ("best.pt", "last.pt"):
        if (Path(run_dir) / "checkpoints" / name).exists():
            return Path(run_dir) / "checkpoints" / name
    raise CheckpointError(f"{run_dir} holds no checkpoints/best.pt or checkpoints/last.pt; "
                          "pass a checkpoint file or a run folder that finished an epoch")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The verified checkpoint dict; CheckpointError naming the file and what is wrong with it otherwise."""
    path = Path(path)
    if path.is_dir():
        path = run_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file written by `cudacnn train`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from exc
    if data.startswith(MAGIC):
        payload = _verified_payload(path, memoryview(data)[len(MAGIC):])
    elif data.startswith(ZIP_MAGIC):
        raise CheckpointError(f"{path} is a plain torch.save file with no integrity header (an earlier cudacnn's "
                              "checkpoint, or another program's): it cannot be verified; train the run again")
    else:
        raise CheckpointError(f"{path} is not a cudacnn checkpoint: {_what_it_is(data)}; pass a checkpoint "
                              "that `cudacnn train` wrote (RUN/checkpoints/last.pt or best.pt)")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, KeyError,
            ValueError, TypeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]  # some errors have no message
        if isinstance(exc, pickle.UnpicklingError):  # torch's advice to load with weights_only=False is unsafe
            reason = "it holds objects other than tensors and plain data"
        raise CheckpointError(f"{path} is not a readable cudacnn checkpoint ({reason[:200]}); "
                              "it may be truncated, or not a weights-only file") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cudacnn checkpoint (no '{FORMAT}' marker); "
                              "for torchvision ImageNet weights use `--pretrained`")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version-{ckpt.get('version')} cudacnn checkpoint; this cudacnn reads "
                              f"version {VERSION}: train it again, or use the cudacnn that wrote it")
    _check_keys(path, ckpt)
    return ckpt


def _verified_payload(path: Path, rest: memoryview) -> memoryview:
    end = bytes(rest[:512]).find(b"\n")
    try:
        header = json.loads(bytes(rest[:end])) if end >= 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not {"container", "size", "sha256"} <= header.keys():
        raise CheckpointError(f"{path} has a damaged checkpoint header; restore it from a copy or retrain")
    if header["container"] != CONTAINER:
        raise CheckpointError(f"{path} is a checkpoint of container version {header['container']}, this cudacnn "
                              f"reads version {CONTAINER}; use the cudacnn version that wrote it")
    payload = rest[end + 1:]
    if len(payload) != header["size"]:
        raise CheckpointError(f"{path} is truncated or padded: {len(payload)} bytes of tensors where its header "
                              f"says {header['size']}; use another checkpoint (e.g. the run's other .pt) or retrain")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 does not match the one written with it (changed "
                              "bytes on disk or in a copy); use another checkpoint or copy it again")
    return payload


def _what_it_is(data: bytes) -> str:
    """A guess at what a file that is not a checkpoint is, for the error message."""
    head = data[:4096]
    if not data:
        return "the file is empty (0 bytes)"
    if head[:1] == b"\x08" and _is_onnx(data):  # an ONNX ModelProto starts with its ir_version field
        return "it is an ONNX model (what `cudacnn export` writes; run it with onnxruntime)"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "it is an image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file of {len(data)} bytes (starting {text[:20]!r})"
    return f"{len(data)} bytes of unknown binary data"


def _is_onnx(data: bytes) -> bool:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        return False
    try:
        return len(onnx.load_model_from_string(data).graph.node) > 0
    except (DecodeError, ValueError, RuntimeError):
        return False


def _check_keys(path: Path, ckpt: dict) -> None:
    """Refuse a well-formed file that lacks what loading or resuming reads (one line, not a KeyError)."""
    for key, kind in REQUIRED.items():
        if key not in ckpt:
            raise CheckpointError(f"{path} is an incomplete cudacnn checkpoint: it has no '{key}'; "
                                  "use a checkpoint that `cudacnn train` wrote")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"{path} is a damaged cudacnn checkpoint: '{key}' is a "
                                  f"{type(ckpt[key]).__name__}; use a checkpoint that `cudacnn train` wrote")
    state = ckpt.get("train_state")
    if state is not None:
        missing = [key for key in TRAIN_STATE if key not in state] if isinstance(state, dict) else ["all"]
        if missing:
            raise CheckpointError(f"{path} is an incomplete cudacnn checkpoint: its train_state lacks "
                                  f"{', '.join(repr(k) for k in missing)}; use the run's other checkpoint, "
                                  "or start a new run")


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
