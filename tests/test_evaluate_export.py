"""ONNX export: onnxruntime parity on a tiny model, metadata, dynamic batch, and a failed check writes
nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from cudacnn.cli import main  # noqa: E402
from cudacnn.errors import CudacnnError  # noqa: E402
from cudacnn.evaluate import export  # noqa: E402
from cudacnn.models import create_model  # noqa: E402

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
    monkeypatch.setattr(export, "check_parity", lambda model, path: 0.5)
    target = tmp_path / "model.onnx"
    with pytest.raises(CudacnnError, match=r"parity check failed: max abs difference 0.5 > 0.001"):
        export.export_onnx(checkpoint[1], target)
    assert list(tmp_path.iterdir()) == []
