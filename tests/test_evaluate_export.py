"""ONNX export: onnxruntime parity on a tiny model, metadata, dynamic batch, and a failed check writes
nothing. safetensors export: the weights rebuild the same model. Both are base dependencies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cudacnn.cli import main
from cudacnn.errors import CudacnnError
from cudacnn.evaluate import export
from cudacnn.models import create_model

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from cudacnn.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("simple", num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"model_name": "simple", "model_kwargs": {}, "classes": CLASSES,
                           "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "model": model.state_dict(),
                           "epoch": 3, "config": {}})
    return path, model.eval()


@pytest.mark.slow  # the first export loads the torch.export machinery (~10 s on 2 cores)
def test_export_command_parity_and_metadata(checkpoint, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    path, model = checkpoint
    target = tmp_path / "out" / "model.onnx"
    assert main(["export", str(path), "--onnx", str(target)]) == 0
    out = capsys.readouterr().out
    assert "max abs difference" in out
    diff = float(out.split("max abs difference ")[1].split()[0])
    assert diff <= 1e-3
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and meta["model_name"] == "simple"
    # our own parity check, at a batch size the exporter never saw
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["model.onnx"]  # no temp files left


def test_export_to_a_path_that_cannot_be_a_file(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path, tmp_path / "afile" / "model.onnx"):  # a folder; a file where a folder must be
        assert main(["export", str(path), "--onnx", str(target)]) == 2
        assert f"--onnx {target} cannot be written as a file" in capsys.readouterr().err


def test_failed_parity_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "check_parity", lambda model, path, size: 0.5)
    target = tmp_path / "model.onnx"
    with pytest.raises(CudacnnError, match=r"parity check failed: max abs difference 0.5 > 0.001"):
        export.export_onnx(checkpoint[1], target)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export_rebuilds_the_model(checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, model = checkpoint
    target = tmp_path / "w" / "model.safetensors"
    assert main(["export", str(path), "--safetensors", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    with safe_open(str(target), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["mean"]) == [0.5] * 3 and meta["epoch"] == "4"
    rebuilt = create_model(meta["model_name"], num_classes=len(CLASSES), **json.loads(meta["model_kwargs"]))
    rebuilt.load_state_dict(load_file(str(target)))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]
    assert main(["export", str(path)]) == 2
    assert "export needs --onnx FILE and/or --safetensors FILE" in capsys.readouterr().err


@pytest.mark.slow  # trains a tiny run and exports it to ONNX
def test_a_run_trained_at_another_image_size_exports_at_that_size(tmp_path, capsys):
    import onnx
    import onnxruntime as ort
    from safetensors import safe_open

    from cifar_archives import png_bytes, write_folder
    from cudacnn.train.checkpoint import model_from_checkpoint

    rng = np.random.default_rng(0)
    files = {f"pics/{c}/{i}.png": png_bytes(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
             for c in ("a", "b") for i in range(5)}
    root = write_folder(tmp_path / "t", files)
    assert main(["train", "--data", str(root), "--model", "smallnet", "--model-kwargs", '{"widths": [4, 8, 8]}',
                 "--image-size", "24", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--amp", "none",
                 "--val-fraction", "0", "--out", str(tmp_path / "runs"), "--name", "r", "--cache-dir",
                 str(tmp_path / "c"), "--quiet"]) == 0
    run = tmp_path / "runs" / "r"
    onnx_path, st_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    assert main(["export", str(run), "--onnx", str(onnx_path), "--safetensors", str(st_path)]) == 0
    proto = onnx.load(str(onnx_path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 24, 24]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input"].startswith("float32 NCHW 24x24 RGB") and json.loads(meta["image_size"]) == 24
    with safe_open(str(st_path), "pt") as f:
        st_meta = f.metadata()
    assert st_meta["input"] == meta["input"] and st_meta["image_size"] == "24"
    model, _ = model_from_checkpoint(run, device="cpu")
    x = torch.randn(3, 3, 24, 24)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(x).numpy(), atol=1e-4, rtol=1e-4)


def test_a_missing_exporter_names_the_install_command(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(CudacnnError, match="pip install onnx onnxruntime onnxscript"):
        export.export_onnx(checkpoint[1], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
