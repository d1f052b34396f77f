"""ONNX export with an onnxruntime parity check. The graph takes normalized float32 NCHW images with a
dynamic batch axis and returns logits; classes, mean and std ride along as ONNX metadata.
safetensors export: the weights alone (no pickle), with the same facts as string metadata."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cudacnn.errors import CudacnnError
from cudacnn.atomic import atomic_output

PARITY_TOLERANCE = 1e-3


# The exporter warns about torchvision ops we never use and logs its optimizer passes at INFO.
NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")


@contextmanager
def quiet_exporter():
    """Keep the CLI output to our own lines while torch.onnx.export runs."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export itself
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_parity(model: torch.nn.Module, onnx_path: Path, image_size: int = 32, batch_sizes=(1, 4),
                 seed: int = 0) -> float:
    """Largest |torch - onnxruntime| over random image_size x image_size inputs of several batch sizes (tests the
    dynamic axis)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, image_size, image_size, generator=gen)
            expected = model(x).numpy()
            got = session.run(None, {name: x.numpy()})[0]
            worst = max(worst, float(np.abs(expected - got).max()))
    return worst


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export_onnx(model: torch.nn.Module, path: str | Path, metadata: dict | None = None, image_size: int = 32,
                tolerance: float = PARITY_TOLERANCE) -> float:
    """Export a CPU float32 eval-mode copy of `model`, taking image_size x image_size images (the size it was
    trained at), to `path`; returns the parity max abs difference.
    The file appears only after the check passes (written beside `path`, then renamed)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError as exc:
        raise CudacnnError(f"ONNX export needs {exc.name}, a dependency of cudacnn missing here; "
                           "install it with: pip install onnx onnxruntime onnxscript") from exc
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    example = torch.randn(2, 3, image_size, image_size)
    with atomic_output(path, ".onnx") as tmp:
        with quiet_exporter():
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(tmp))
        if metadata:
            add_metadata(tmp, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        diff = check_parity(model, tmp, image_size)
        if not diff <= tolerance:  # also catches NaN
            raise CudacnnError(f"ONNX parity check failed: max abs difference {diff:.3g} > {tolerance:g} between "
                               f"PyTorch and onnxruntime; {path} was not written")
    return diff


def export_safetensors(model: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> int:
    """Write `model`'s state_dict (CPU, as trained) to a .safetensors file with string metadata, read it back
    and check every tensor; returns the number of tensors. The file appears only after the check passes."""
    try:
        from safetensors.torch import load_file, save_file
    except ModuleNotFoundError as exc:
        raise CudacnnError("safetensors export needs the safetensors package, a dependency of cudacnn missing "
                           "here; install it with: pip install safetensors") from exc
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_output(path, ".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **strings})
        loaded = load_file(str(tmp))
        if loaded.keys() != state.keys() or not all(torch.equal(loaded[k], v) for k, v in state.items()):
            raise CudacnnError(f"the safetensors file read back differs from the weights; {path} was not written")
    return len(state)
