"""The example config and sweep files run through the CLI on the CPU, with tiny settings layered on top."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cudacnn.cli import main
from cudacnn.train.config import resolve
from cudacnn.train.sweep import load_spec

from cifar_archives import image_folder_files, write_tar

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = {"epochs": 2, "batch_size": 8, "amp": "none", "model": "simple", "val_fraction": 0.25}


def tiny_archive(tmp_path: Path) -> Path:
    files, _ = image_folder_files(classes=("a", "b"), per_class=8)
    return write_tar(tmp_path / "imgs.tar.gz", files)


def test_example_config_trains(tmp_path):
    config = resolve(None, str(EXAMPLES / "config.yaml"), {})  # valid as written
    assert config.keep_best == 3 and config.log_sinks == ["csv"]  # no optional extra needed
    flags = [item for key, value in TINY.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    args = ["train", "--config", str(EXAMPLES / "config.yaml"), *flags, "--data",
            str(tiny_archive(tmp_path)), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "runs"), "--name", "example", "--quiet"]
    assert main(args) == 0
    run = tmp_path / "runs" / "example"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["label_smoothing"], saved["cutout"], saved["keep_best"], saved["epochs"]) == (0.1, 8, 3, 2)
    assert (run / "metrics.csv").exists() and len(list((run / "checkpoints").glob("best-e*.pt"))) == 2


def test_example_sweep_runs(tmp_path, monkeypatch):
    spec = load_spec(EXAMPLES / "sweep.yaml")
    assert spec["config"] == str((EXAMPLES / "config.yaml").resolve())
    # the example's grid and seeds, one of each, with tiny settings
    spec["grid"] = {key: values[:1] for key, values in spec["grid"].items()} | {"lr": spec["grid"]["lr"]}
    spec["seeds"] = spec["seeds"][:1]
    spec["base"] = {**spec["base"], **TINY, "data": str(tiny_archive(tmp_path)),
                    "cache_dir": str(tmp_path / "cache")}
    tiny = tmp_path / "sweep.yaml"
    tiny.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES.parent / "src"))
    assert main(["sweep", str(tiny), "--device", "cpu", "--out", str(tmp_path / "sweeps"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "sweeps" / "sweep" / "results.json").read_text())
    assert [s["setting"] for s in summary["settings"]] == ["lr=0.1 label_smoothing=0.0", "lr=0.2 label_smoothing=0.0"]
    assert all(s["runs"] == 1 and s["failed"] == 0 for s in summary["settings"])
