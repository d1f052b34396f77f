"""The trainer on the CPU: the loss falls, resume equals an uninterrupted run, early stopping fires,
NaN is caught, checkpoints of another model are refused, bad flags are rejected."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cudacnn.cli import main
from cudacnn.data import Dataset, Split
from cudacnn.errors import CheckpointError, ConfigError, CudacnnError
from cudacnn.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cudacnn.train.config import TrainConfig, resolve
from cudacnn.train.trainer import Trainer, TrainingDiverged

from cifar_archives import image_folder_files, write_tar


def learnable_dataset(n_train=320, n_test=100, classes=4, seed=0) -> Dataset:
    """Each class is a fixed random pattern plus noise: a small CNN separates them in a few epochs."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, (classes, 32, 32, 3))

    def split(n):
        labels = rng.integers(0, classes, n)
        noise = rng.normal(0, 60, (n, 32, 32, 3))
        return Split(np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels)

    return Dataset("patterns", [f"c{i}" for i in range(classes)], split(n_train), split(n_test), source="synthetic")


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(model="simple", epochs=3, batch_size=32, optimizer="adam", lr=2e-3, weight_decay=0.0,
                schedule="onecycle", amp="none", device="cpu", val_fraction=0.2, out=str(tmp_path / "runs"),
                deterministic=True)
    base.update(overrides)
    return TrainConfig(**base).validate()


@pytest.fixture(scope="module")
def dataset():
    return learnable_dataset()


def test_loss_falls_and_run_folder_is_complete(tmp_path, dataset):
    result = Trainer(tiny_config(tmp_path, epochs=4, name="a"), dataset=dataset, quiet=True).fit()
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.test_accuracy > 0.8  # four classes: chance is 0.25
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.html", "summary.md",
                 "checkpoints/last.pt", "checkpoints/best.pt", "plots/curves.png", "plots/confusion.png"):
        assert (run / name).exists(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(result.test_accuracy)
    model, ckpt = model_from_checkpoint(run / "checkpoints" / "best.pt")
    assert ckpt["classes"] == dataset.classes and len(ckpt["mean"]) == 3
    assert "train_state" not in ckpt  # the evaluation weights only; resuming reads last.pt
    assert "train_state" in load_checkpoint(run / "checkpoints" / "last.pt")
    assert evaluation["checkpoint"] == str(run / "checkpoints" / "best.pt")


def test_backward_runs_on_the_calling_thread(tmp_path, dataset):
    """On one device the step's backward runs with autograd's device threads off (the trainer's choice for small
    nets' eager steps); the setting is restored after each backward."""
    seen = []
    trainer = Trainer(tiny_config(tmp_path, epochs=1, name="threads"), dataset=dataset, quiet=True)
    next(trainer.model.parameters()).register_hook(lambda _: seen.append(torch._C._is_multithreading_enabled()))
    trainer.fit()
    assert seen and not any(seen)
    assert torch._C._is_multithreading_enabled()


def _final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["model"]


def straight_and_resumed(config: TrainConfig, dataset: Dataset):
    """The results of `config` trained straight through, and trained again, interrupted after its second epoch
    and resumed (run folders "straight" and "interrupted" under config.out)."""
    straight = Trainer(dataclasses.replace(config, name="straight"), dataset=dataset, quiet=True).fit()

    def interrupt_after_second(trainer, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    interrupted = dataclasses.replace(config, name="interrupted")
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, dataset=dataset, callbacks=(interrupt_after_second,), quiet=True).fit()
    run_dir = Path(config.out) / "interrupted"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    return straight, Trainer(interrupted, run_dir=run_dir, resume=True, dataset=dataset, quiet=True).fit()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="resuming on a GPU needs a CUDA GPU")])])
def test_resume_ends_with_the_same_weights(tmp_path, dataset, device):
    # bn_dropout: dropout draws from the RNG, so the saved RNG state must be restored for equality. On a GPU the
    # checkpoint is read onto the GPU, the generators' saved states with it.
    config = tiny_config(tmp_path, model="bn_dropout", epochs=3, batch_size=64, device=device)
    straight, resumed = straight_and_resumed(config, dataset)
    a, b = _final_weights(straight.run_dir), _final_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


def test_interrupted_in_its_first_epoch_a_run_resumes_from_the_start(tmp_path, dataset, monkeypatch, caplog):
    config = tiny_config(tmp_path, epochs=2)
    straight = Trainer(dataclasses.replace(config, name="straight"), dataset=dataset, quiet=True).fit()
    interrupted = dataclasses.replace(config, name="interrupted")
    trainer = Trainer(interrupted, dataset=dataset, quiet=True)
    monkeypatch.setattr(trainer, "_train_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert "no epoch finished yet, so it starts over" in caplog.text
    run_dir = tmp_path / "runs" / "interrupted"
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    resumed = Trainer(interrupted, run_dir=run_dir, resume=True, dataset=dataset, quiet=True).fit()
    a, b = _final_weights(straight.run_dir), _final_weights(resumed.run_dir)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resume_refuses_to_stretch_a_planned_schedule(tmp_path, dataset):
    from cudacnn.train.trainer import resume_config

    result = Trainer(tiny_config(tmp_path, epochs=1, name="short"), dataset=dataset, quiet=True).fit()
    with pytest.raises(ConfigError, match="onecycle learning-rate schedule is planned for 1 epochs"):
        resume_config(result.run_dir, {"epochs": 2})
    assert resume_config(result.run_dir, {"epochs": 1, "device": "cpu"}).epochs == 1
    flat = Trainer(tiny_config(tmp_path, epochs=1, schedule="none", name="flat"), dataset=dataset, quiet=True).fit()
    assert resume_config(flat.run_dir, {"epochs": 2}).epochs == 2  # a constant rate has nothing to stretch
    resumed = Trainer(resume_config(flat.run_dir, {"epochs": 2}), run_dir=flat.run_dir, resume=True,
                      dataset=dataset, quiet=True).fit()
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_early_stopping_fires(tmp_path, dataset):
    config = tiny_config(tmp_path, epochs=10, lr=1e-9, schedule="none", early_stopping=2, crop_pad=0, flip="none")
    result = Trainer(config, dataset=dataset, quiet=True).fit()
    assert result.epochs_done == 3  # epoch 1 sets the best; 2 and 3 do not beat it
    # stopped before its evaluation was written (a full disk, say): the resume evaluates, trains nothing more
    (result.run_dir / "eval.json").unlink()
    resumed = Trainer(config, run_dir=result.run_dir, resume=True, dataset=dataset, quiet=True).fit()
    assert resumed.epochs_done == 3 and (result.run_dir / "eval.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    def explode(trainer, record):
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e30
    config = tiny_config(tmp_path, schedule="none", optimizer="sgd", epochs=3, name="nan")
    with pytest.raises(TrainingDiverged, match="NaN/inf in epoch 2.*last good checkpoint"):
        Trainer(config, dataset=dataset, callbacks=(explode,), quiet=True).fit()
    ckpt = load_checkpoint(tmp_path / "runs" / "nan" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_model_is_refused(tmp_path, dataset):
    result = Trainer(tiny_config(tmp_path, epochs=1, name="simple"), dataset=dataset, quiet=True).fit()
    ckpt = load_checkpoint(result.run_dir)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        model_from_checkpoint({**ckpt, "model_name": "bn_dropout"})
    other = dataclasses.replace(tiny_config(tmp_path, epochs=2), model="bn_dropout")
    with pytest.raises(CheckpointError, match="model 'simple'"):
        Trainer(other, run_dir=result.run_dir, resume=True, dataset=dataset, quiet=True).fit()
    ckpts = result.run_dir / "checkpoints"
    (ckpts / "last.pt").write_bytes((ckpts / "best.pt").read_bytes())  # weights only: nothing to resume from
    with pytest.raises(CheckpointError, match="holds weights only"):
        Trainer(tiny_config(tmp_path, epochs=2), run_dir=result.run_dir, resume=True, dataset=dataset,
                quiet=True).fit()


def test_checkpoints_store_the_shape_and_refuse_other_versions(tmp_path, dataset):
    config = tiny_config(tmp_path, model="fast96", model_kwargs={"widths": [8, 8, 16]}, epochs=1, name="f96")
    run = Trainer(config, dataset=dataset, quiet=True).fit().run_dir
    model, ckpt = model_from_checkpoint(run)
    shape = {"widths": [8, 8, 16], "activation": "gelu"}  # the defaults are stored too
    assert ckpt["model_kwargs"] == shape and ckpt["config"]["model_kwargs"] == shape
    assert yaml.safe_load((run / "config.yaml").read_text())["model_kwargs"] == shape  # what a resume rebuilds
    assert model.head.in_features == 16
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    save_checkpoint(last, {**state, "version": 1})
    with pytest.raises(CheckpointError, match="version-1 cudacnn checkpoint; this cudacnn reads version 2"):
        load_checkpoint(last)
    # a resume that would build another net than the checkpoint's is refused by name
    save_checkpoint(last, {**state, "model_kwargs": {"widths": [8, 8, 32]}})
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        Trainer(tiny_config(tmp_path, model="fast96", model_kwargs={"widths": [8, 8, 16]}, epochs=2),
                run_dir=run, resume=True, dataset=dataset, quiet=True).fit()


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="x.pt is not a cudacnn checkpoint: it is a text file"):
        load_checkpoint(bad)
    bad.write_bytes(b"PK\x03\x04garbage")  # a zip (torch.save's format) without the header: nothing to verify
    with pytest.raises(CheckpointError, match="x.pt is a plain torch.save file with no integrity header"):
        load_checkpoint(bad)
    torch.save({"format": "cudacnn-checkpoint", "version": 2, "weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="cannot be verified; train the run again"):
        load_checkpoint(bad)


@pytest.mark.parametrize("flags, message", [
    (["--amp", "fp8"], "amp must be"), (["--epochs", "0"], "epochs must be"),
    (["--val-fraction", "1.5"], "val-fraction"), (["--early-stopping", "3", "--val-fraction", "0"], "validation split"),
    (["--compile", "--compile-mode", "fastest"], "compile-mode must be one of default, reduce-overhead"),
    (["--lr", "inf"], "lr must be positive and finite"), (["--momentum", "-1"], "momentum must be in [0, 1)"),
    (["--momentum", "nan"], "momentum must be in [0, 1)"), (["--weight-decay", "-1"], "weight-decay must be >= 0"),
    (["--weight-decay", "nan"], "weight-decay must be >= 0"), (["--grad-clip", "nan"], "grad-clip must be >= 0"),
    (["--warmup-epochs", "-3"], "warmup-epochs must be >= 0"), (["--crop-pad", "32"], "crop-pad must be below 32"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"), (["--seed", str(2**32)], "seed must be in [0, 2**32)"),
    (["--model-kwargs", "[1]"], "model_kwargs must be dict"), (["--device", "foo"], "device must be auto, cpu"),
    (["--name", "../elsewhere"], "name must be a plain folder name"), (["--name", "a/b"], "name must be a plain"),
    (["--cuda-graphs", "--compile"], "cuda-graphs replays the eager model's kernels and compile compiles them"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA GPU and this run is on cpu"),
])
def test_bad_flag_values_are_rejected(flags, message, tmp_path, capsys):
    assert main(["train", "--model", "simple", "--out", str(tmp_path / "runs"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any run folder


@pytest.mark.parametrize("text, message", [
    ("epochs: ten\n", "epochs must be int, got 'ten' (str)"), ("lr: '0.1'\n", "lr must be float, got '0.1'"),
    ("epochs: 1.5\n", "epochs must be int, got 1.5 (float)"), ("model_kwargs: [1]\n", "model_kwargs must be dict"),
    ("tta: 1\n", "tta must be bool"), ("epochs: true\n", "epochs must be int, got True"),
])
def test_config_file_values_of_the_wrong_type(tmp_path, text, message):
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(None, str(bad), {})


def test_validation_split_that_leaves_no_training_images(tmp_path):
    small = learnable_dataset(n_train=12, n_test=8, classes=3)
    with pytest.raises(ConfigError, match="--val-fraction 0.96 leaves no training images of 12; lower it"):
        Trainer(tiny_config(tmp_path, val_fraction=0.96), dataset=small, quiet=True)


@pytest.mark.parametrize("recipe", [["--model", "simple"], ["--preset", "fast94"]], ids=["trainer", "record"])
def test_out_that_is_a_file(tmp_path, capsys, recipe):
    files, _ = image_folder_files()
    data = write_tar(tmp_path / "t.tar.gz", files)
    (tmp_path / "runs").write_text("x")
    assert main(["train", *recipe, "--out", str(tmp_path / "runs"), "--device", "cpu", "--data", str(data),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"--out {tmp_path / 'runs'} is a file; name the folder" in capsys.readouterr().err


def test_config_file_that_is_not_text_or_not_a_file(tmp_path):
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="is not readable text"):
        resolve(None, str(binary), {})
    with pytest.raises(ConfigError, match="is not a file"):
        resolve(None, str(tmp_path), {})


def test_unknown_preset_and_config_keys(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])
    bad = tmp_path / "c.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        resolve(None, str(bad), {})


def test_preset_config_and_flags_layer(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 7, "lr": 0.05}))
    config = resolve("keras-cnn", str(cfg), {"lr": 0.01, "batch_size": None})
    assert (config.model, config.batch_size, config.epochs, config.lr) == ("simple", 32, 7, 0.01)


def test_large_batch_preset_differs_from_resnet18_cifar_only_in_scale():
    """resnet18-cifar-4k is resnet18-cifar at 8x the batch: same model and augmentation, so a multi-GPU
    speed-up measured with it compares like with like."""
    base, large = resolve("resnet18-cifar", None, {}), resolve("resnet18-cifar-4k", None, {})
    changed = {k for k, v in large.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {"batch_size", "lr", "epochs", "compile", "compile_mode", "preset"}
    assert (large.batch_size, large.compile_mode) == (4096, "reduce-overhead")


def test_cli_trains_from_an_archive(tmp_path, capsys):
    files, _ = image_folder_files(classes=("a", "b"), per_class=12)
    tar = write_tar(tmp_path / "imgs.tar.gz", files)
    args = ["train", "--data", str(tar), "--model", "simple", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--amp", "none", "--out", str(tmp_path / "runs"), "--name", "cli",
            "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "runs" / "cli" / "report.html").exists()
    assert main(args) == 2  # the folder exists now
    assert "already exists" in capsys.readouterr().err


def test_record_preset_runs_seeds_and_summarizes(tmp_path, monkeypatch, dataset, caplog):
    from cudacnn.train import record
    from cudacnn.train.fast import recipe

    real = recipe.train_fast
    seeds, settings = [], []

    def recording(name, data, **kw):
        seeds.append(kw["seed"])
        settings.append({k: kw[k] for k in ("epochs", "max_steps", "batch_size")})
        return real(name, data, **kw)

    monkeypatch.setattr(recipe, "train_fast", recording)
    monkeypatch.setattr(record, "load_dataset", lambda *a, **k: dataset)
    # the recipe cut to two steps by --set, so it runs on the CPU
    config = resolve("fast94", None, {"device": "cpu", "out": str(tmp_path), "name": "rec", "runs": 2, "seed": 5,
                                      "compile": False, "recipe": {"epochs": 1, "max_steps": 2, "batch_size": 64}})
    with caplog.at_level("INFO", logger="cudacnn.train.record"):
        summary = record.run_record(config)
    assert seeds == [5, 6] and summary["runs"] == 2
    assert f"fast94: 2 run(s) on cpu, seeds 5-6, into {tmp_path / 'rec'}" in caplog.text  # said at the start
    assert settings == [dict(epochs=1.0, max_steps=2, batch_size=64)] * 2
    accs = [row["test_acc"] for row in summary["rows"]]
    assert summary["acc_min"] == min(accs) and summary["acc_mean"] == pytest.approx(sum(accs) / 2)
    model, ckpt = model_from_checkpoint(tmp_path / "rec" / "run1" / "checkpoints" / "last.pt")
    assert ckpt["model_name"] == "fast94" and ckpt["config"]["seed"] == 6
    from cudacnn.train.presets import PRESETS

    recipe = ckpt["config"]["recipe"]
    assert recipe["max_steps"] == 2 and recipe["muon_lr"] == PRESETS["fast94"]["record"].muon_lr  # the whole recipe
    assert model.head.in_features == 256 and ckpt["model_kwargs"]["widths"] == [64, 256, 256]
    assert ckpt["model_kwargs"]["activation"] == ckpt["config"]["recipe"]["activation"]  # the net trained
    # the normalization the recipe trained with (fixed CIFAR-10 statistics), not this data set's own
    from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, channel_stats
    assert tuple(ckpt["mean"]) == CIFAR10_MEAN and tuple(ckpt["std"]) == CIFAR10_STD
    assert not np.allclose(channel_stats(dataset.train.images)[0], CIFAR10_MEAN, atol=1e-3)
    assert json.loads((tmp_path / "rec" / "results.json").read_text())["preset"] == "fast94"
    with pytest.raises(CudacnnError, match="already exists"):  # the same name again: a clear refusal
        record.run_record(config, quiet=True)



@pytest.mark.parametrize("gpus", ["1", "2"])
def test_record_preset_refuses_flags_its_recipe_ignores(tmp_path, capsys, gpus):
    """--lr or --compile-mode with fast94 would be silently dropped: refused before any folder, sweep or launch."""
    argv = ["train", "--preset", "fast94", "--out", str(tmp_path), "--name", "x", "--runs", "2", "--gpus", gpus,
            "--device", "cpu", "--compile-mode", "max-autotune", "--lr", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--preset fast94 sets its own recipe; drop --compile-mode, --lr" in err
    assert "change the recipe with --set KEY=VALUE (see train/fast/fast94.py)" in err
    assert list(tmp_path.iterdir()) == []


def test_set_changes_record_recipes_only(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--device", "cpu"]
    assert main(["train", "--preset", "fast94", "--set", "muon_lr=fast", *out]) == 2
    assert "muon_lr must be float" in capsys.readouterr().err
    assert main(["train", "--preset", "fast94", "--set", "keep_fraction=2", *out]) == 2
    assert "keep_fraction must be in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--preset", "keras-cnn", "--set", "epochs=2", *out]) == 2
    assert "change the record presets (fast94, fast96) only" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_print_config_of_a_record_preset_is_its_recipe_and_reads_back(tmp_path, capsys):
    argv = ["train", "--preset", "fast94", "--set", "epochs=7", "--device", "cpu", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"]["epochs"] == 7.0 and printed["recipe"]["batch_size"] == 1536
    assert printed["preset"] == "fast94" and "lr" not in printed and "batch_size" not in printed
    saved = tmp_path / "config.yaml"  # what a record run writes as its config.yaml
    saved.write_text(yaml.safe_dump(printed))
    assert main(["train", "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_record_preset_refuses_settings_from_a_config_file_or_a_sweep_job(tmp_path, capsys):
    from cudacnn.train import record

    config_file = tmp_path / "job.yaml"
    config_file.write_text("preset: fast96\nlr: 0.5\nmodel_kwargs: {logit_scale: 0.5}\nseed: 3\n")
    out = tmp_path / "runs"
    assert main(["train", "--config", str(config_file), "--out", str(out), "--device", "cpu"]) == 2
    assert "--preset fast96 sets its own recipe; drop --lr, --model-kwargs" in capsys.readouterr().err
    assert not out.exists()
    job = resolve(None, str(config_file), {"out": str(out)})  # as a sweep worker resolves its job file
    with pytest.raises(ConfigError, match="drop --lr, --model-kwargs"):
        record.run_record(job, quiet=True)
    assert not out.exists()


def test_out_of_memory_names_a_smaller_batch(tmp_path, dataset):
    trainer = Trainer(tiny_config(tmp_path, epochs=1, batch_size=64), dataset=dataset, quiet=True)

    def oom(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.forward = oom
    with pytest.raises(CudacnnError, match="out of memory at batch size 64; try --batch-size 32"):
        trainer.fit()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 9, 200])
def test_onecycle_handles_short_runs(steps):
    from cudacnn.train.setup import build_scheduler

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, TrainConfig(epochs=1, lr=0.1), steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler:
            scheduler.step()
    assert max(rates) == pytest.approx(0.1, rel=0.05)
    if steps >= 4:
        # warm-up from peak / 25, annealed to peak / 25 / 1000 (OneCycle's div_factor and final_div_factor)
        assert rates[0] == pytest.approx(0.1 / 25) and rates[-1] == pytest.approx(0.1 / 25 / 1e3, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (compile mode reduce-overhead) need a CUDA GPU")
def test_cuda_graph_training_matches_eager_on_gpu(tmp_path, dataset):
    """`--compile --compile-mode reduce-overhead` replays the step from CUDA graphs: the same training as eager.
    SGD, not Adam: Adam's normalised update turns last-bit differences in tiny gradients (Inductor's fused fp32
    kernels against eager's) into full-size steps, so its weights part beyond any tolerance (seen on an H200)."""
    finals = {}
    for name, compiled in (("eager", False), ("graphs", True)):
        config = tiny_config(tmp_path, device="cuda", epochs=2, name=name, compile=compiled, optimizer="sgd",
                             lr=0.05, compile_mode="reduce-overhead", deterministic=False, tf32=False)
        result = Trainer(config, dataset=dataset, quiet=True).fit()
        finals[name] = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]
    for key, eager in finals["eager"].items():
        torch.testing.assert_close(finals["graphs"][key].float(), eager.float(), rtol=1e-3, atol=1e-4, msg=key)


def test_resume_takes_only_device_like_flags(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.5"]) == 2
    assert "--resume continues a run with its saved config; drop lr" in capsys.readouterr().err
    # compile settings may change on resume: past the flag check, to the (missing) run folder
    assert main(["train", "--resume", str(tmp_path), "--compile", "--compile-mode", "reduce-overhead"]) == 2
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--no-cuda-graphs"]) == 2  # a graphed run resumed on a CPU
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err
