"""A first run on any machine: progress within the first step and then every second, plain lines where output
is not a terminal, and a CPU-sized default run announced in one line."""

from __future__ import annotations

import logging
import re
import types

import numpy as np
import pytest
import torch

from cudacnn import progress
from cudacnn.cli import main
from cudacnn.data import Dataset, Split
from cudacnn.train import trainer as trainer_module
from cudacnn.train.config import TrainConfig, resolve
from cudacnn.train.cpu_plan import CPU_WIDTHS, IMAGE_BUDGET, cpu_sized


def dataset(n_train=96, n_test=16) -> Dataset:
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 2, n))  # noqa: E731
    return Dataset("noise", ["a", "b"], split(n_train), split(n_test), source="synthetic")


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(model="simple", epochs=2, batch_size=16, optimizer="adam", lr=1e-3, amp="none", device="cpu",
                val_fraction=0.0, out=str(tmp_path / "runs"), schedule="none")
    return TrainConfig(**{**base, **overrides})


class Recorder:
    """A stand-in for rich.Progress that keeps every update."""

    def __init__(self):
        self.updates = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add_task(self, description, total=None, **fields):
        return 0

    def update(self, task, completed=None, **fields):
        self.updates.append((completed, fields.get("stats", "")))

    def remove_task(self, task):
        pass


def test_the_first_step_is_shown_at_once(tmp_path, monkeypatch):
    shown = Recorder()
    clock = iter(i / 10 for i in range(10_000))  # each reading of the trainer's clock 0.1 s after the last
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(trainer_module, "make_progress", lambda quiet: shown)
    trainer_module.Trainer(config(tmp_path, epochs=1), dataset=dataset(), quiet=True).fit()
    steps = 96 // 16
    # fast steps: the first (an ETA at once) and the last; none between, each would cost a host sync
    assert [c for c, _ in shown.updates] == [1, steps]
    assert re.fullmatch(r"loss \d+\.\d{3} acc \d\.\d{3} [\d,]+ img/s, run ETA \d+:\d\d", shown.updates[0][1])


def test_progress_is_refreshed_every_second(tmp_path, monkeypatch):
    shown = Recorder()
    clock = iter(range(0, 1_000_000, 2))  # every reading of the trainer's clock is 2 s after the last
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(trainer_module, "make_progress", lambda quiet: shown)
    trainer_module.Trainer(config(tmp_path, epochs=2), dataset=dataset(), quiet=True).fit()
    assert [c for c, _ in shown.updates] == [1, 2, 3, 4, 5, 6] * 2  # every step, since each took over 1 s
    # run ETA: the steps left in the run at the epoch's pace (first update: 11 steps left, 4 s per step so far)
    assert shown.updates[0][1].endswith("run ETA 0:44")


def test_without_a_terminal_progress_is_plain_lines(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cudacnn.progress"):
        trainer_module.Trainer(config(tmp_path, epochs=2), dataset=dataset(), quiet=False).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "cudacnn.progress"]
    assert lines, "no progress lines"
    pattern = r"epoch [12]/2 [1-6]/6 loss \d+\.\d{3} acc \d\.\d{3} [\d,]+ img/s, run ETA \d+:\d\d epoch ETA \d+:\d\d"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert any(line.startswith("epoch 2/2 6/6") for line in lines)


def test_plain_progress_prints_at_most_every_few_seconds(caplog):
    ticks = iter([0, 1, 2, 6, 7, 12])
    plain = progress.PlainProgress(every=5.0, clock=lambda: next(ticks))
    task = plain.add_task("decoding", total=100, unit="images")  # t = 0
    with caplog.at_level(logging.INFO, logger="cudacnn.progress"):
        for done in (10, 20, 60, 70, 90):  # at t = 1, 2, 6, 7, 12
            plain.update(task, completed=done)
    # shown at once (t = 1: 10 done in 1 s, 90 left), then t = 6 (60 in 6 s: 40 left at 10/s) and t = 12
    # (90 in 12 s: 10 left, 1.33 s); not at t = 2 or 7, under 5 s after the last line
    assert [r.getMessage() for r in caplog.records] == ["decoding 10/100 images ETA 0:09",
                                                        "decoding 60/100 images ETA 0:04",
                                                        "decoding 90/100 images ETA 0:01"]


# ------------------------------------------------------------------ the CPU-sized default

def test_cpu_sized_cuts_the_default_recipe_to_the_budget(caplog):
    default = resolve("smallnet-plus", None, {})
    with caplog.at_level(logging.INFO):
        full = cpu_sized(default, 50_000)
    assert full.epochs == max(1, round(IMAGE_BUDGET / 50_000)) and full.model_kwargs["widths"] == CPU_WIDTHS
    assert caplog.records[-1].getMessage().startswith(f"no GPU: CPU-sized run of smallnet-plus: smallnet at widths "
                                                      f"32-64-128, {full.epochs} epochs instead of {default.epochs} "
                                                      f"({full.epochs * 50_000:,} training images)")
    assert cpu_sized(default, 2_000).epochs == min(default.epochs, round(IMAGE_BUDGET / 2_000))
    assert cpu_sized(default, 10**7).epochs == 1  # at least one epoch
    simple = cpu_sized(TrainConfig(model="simple", epochs=30), 5_000)
    assert simple.model_kwargs == {} and simple.epochs == round(IMAGE_BUDGET / 5_000)


class FakeTrainer:
    calls: list = []

    def __init__(self, **kwargs):
        FakeTrainer.calls.append(kwargs)

    def fit(self):
        return None


@pytest.mark.parametrize("flags,sized", [([], True), (["--device", "cpu"], True), (["--epochs", "3"], False),
                                         (["--preset", "smallnet-plus"], False), (["--model", "simple"], False)])
def test_only_an_unchosen_recipe_is_cpu_sized(tmp_path, monkeypatch, flags, sized):
    FakeTrainer.calls = []
    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    assert main(["train", "--out", str(tmp_path / "runs"), *flags]) == 0
    assert [call["fit_to_cpu"] for call in FakeTrainer.calls] == [sized]


def test_the_cpu_sized_run_is_announced_and_planned(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self: None)
    preset = resolve("smallnet-plus", None, {"device": "cpu", "out": str(tmp_path)})
    n_train = 5_000  # enough images that the budget cuts the preset's epochs
    cut = round(IMAGE_BUDGET / n_train)
    assert 1 <= cut < preset.epochs
    with caplog.at_level(logging.INFO):
        t = trainer_module.Trainer(preset, dataset=dataset(n_train=n_train), quiet=True, fit_to_cpu=True)
    assert t.config.epochs == cut and t.config.model_kwargs["widths"] == CPU_WIDTHS
    assert t.model.fc.in_features == CPU_WIDTHS[-1]
    assert sum("no GPU: CPU-sized run" in r.getMessage() for r in caplog.records) == 1


def test_record_presets_refuse_another_image_size(tmp_path, capsys):
    assert main(["train", "--preset", "fast94", "--image-size", "64", "--out", str(tmp_path)]) == 2
    assert "--preset fast94 sets its own recipe; drop --image-size" in capsys.readouterr().err  # 32x32 nets


def test_image_size_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["train", "--image-size", "4", "--out", str(tmp_path)]) == 2
    assert "image-size must be from 8 to 1024 pixels" in capsys.readouterr().err
    assert main(["train", "--image-size", "16", "--crop-pad", "16", "--out", str(tmp_path)]) == 2
    assert "crop-pad must be below 16, the image size" in capsys.readouterr().err


def test_the_config_checks_the_image_size_against_the_data_layers_bounds(monkeypatch):
    from cudacnn.data import sources
    from cudacnn.errors import ConfigError

    TrainConfig(image_size=sources.MAX_IMAGE_SIZE).validate()
    monkeypatch.setattr(sources, "MAX_IMAGE_SIZE", 64)  # one pair of bounds: the config follows the data layer's
    with pytest.raises(ConfigError, match="image-size must be from 8 to 64 pixels"):
        TrainConfig(image_size=96).validate()


def test_evaluate_and_train_record_the_device_by_one_function():
    from cudacnn.evaluate import commands as evaluate_commands
    from cudacnn.train import setup

    assert trainer_module.device_name is setup.device_name
    assert not hasattr(evaluate_commands, "device_name")  # it uses setup's
    assert setup.device_name(torch.device("cpu")) == "cpu"
