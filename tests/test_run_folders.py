"""Run folders you can trust: checkpoints verified on every load, one line for any file that is not a whole
cudacnn checkpoint, a full disk reported as such with the last good checkpoint intact and resumable, and
`--resume` of a finished run a no-op."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import pathlib

import pytest
import torch

from cudacnn.cli import main
from cudacnn.errors import CheckpointError
from cudacnn.train import checkpoint
from cudacnn.train.checkpoint import load_checkpoint, save_checkpoint

from cifar_archives import image_folder_files, write_tar


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    files, _ = image_folder_files(classes=("a", "b"), per_class=12)
    return write_tar(tmp_path_factory.mktemp("data") / "imgs.tar.gz", files)


def train_args(archive, tmp_path, name, *extra, quiet=True):
    return ["train", "--data", str(archive), "--model", "simple", "--epochs", "3", "--batch-size", "8",
            "--device", "cpu", "--amp", "none", "--out", str(tmp_path / "runs"), "--name", name, "--deterministic",
            "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25", *extra] + ["--quiet"] * quiet


@pytest.fixture(scope="module")
def finished_run(archive, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    assert main(train_args(archive, tmp, "done")) == 0
    return tmp / "runs" / "done"


def weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["model"]


def test_a_flipped_byte_anywhere_in_the_tensors_is_refused(finished_run, tmp_path, capsys):
    last = finished_run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    assert data.startswith(checkpoint.MAGIC)
    for where in (len(data) // 2, len(data) - 3000, len(data) - 1):
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        bad = tmp_path / "flipped.pt"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="flipped.pt is corrupted: its SHA-256 does not match"):
            load_checkpoint(bad)
    # the CLI: one line, exit 2, for evaluate and for resume
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    (run / "checkpoints" / "last.pt").write_bytes(bytes(flipped))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt is corrupted" in err


def test_truncated_text_garbage_onnx_and_foreign_files_get_one_line(finished_run, tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    data = (finished_run / "checkpoints" / "last.pt").read_bytes()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    cases = {
        "truncated": (data[:-100], "is truncated or padded"),
        "header": (checkpoint.MAGIC + b"{not json\n" + data[100:], "damaged checkpoint header"),
        "text": (b"hello\n", "it is a text file of 6 bytes"),
        "empty": (b"", "the file is empty"),
        "garbage": (bytes(range(256)) * 3, "768 bytes of unknown binary data"),
        "onnx": (helper.make_model(graph).SerializeToString(), "it is an ONNX model"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}.pt .*{message}"):
            load_checkpoint(path)
    # a plain torch.save file (nothing to verify), and behind a valid header: another program's dict, and one
    # holding pickled objects (refused without the advice to unpickle)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="plain torch.save file with no integrity header"):
        load_checkpoint(other)

    def with_header(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
        header = {"container": checkpoint.CONTAINER, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        other.write_bytes(checkpoint.MAGIC + json.dumps(header).encode() + b"\n" + payload)

    with_header({"weights": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a cudacnn checkpoint .no 'cudacnn-checkpoint' marker"):
        load_checkpoint(other)
    with_header({"format": checkpoint.FORMAT, "thing": pathlib.Path("x")})
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as refused:
        load_checkpoint(other)
    assert "weights_only=False" not in str(refused.value)


def test_missing_keys_are_named(finished_run, tmp_path, capsys):
    ckpt = load_checkpoint(finished_run / "checkpoints" / "last.pt")
    del ckpt["train_state"]["optimizer"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    save_checkpoint(run / "checkpoints" / "last.pt", ckpt)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "incomplete cudacnn checkpoint: its train_state lacks 'optimizer'" in err
    ckpt = load_checkpoint(finished_run / "checkpoints" / "best.pt")
    del ckpt["classes"]
    save_checkpoint(tmp_path / "noclasses.pt", ckpt)
    with pytest.raises(CheckpointError, match="noclasses.pt is an incomplete cudacnn checkpoint: it has no 'classes'"):
        load_checkpoint(tmp_path / "noclasses.pt")


def test_unverifiable_and_other_version_checkpoints_are_refused(finished_run, tmp_path):
    ckpt = load_checkpoint(finished_run / "checkpoints" / "best.pt")
    torch.save(ckpt, tmp_path / "plain.pt")  # the same dict without the header: no digest to check it by
    with pytest.raises(CheckpointError, match="plain.pt is a plain torch.save file with no integrity header"):
        load_checkpoint(tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "newer.pt", {**ckpt, "version": checkpoint.VERSION + 1})
    with pytest.raises(CheckpointError, match="newer.pt is a version-3 cudacnn checkpoint; this cudacnn reads version 2"):
        load_checkpoint(tmp_path / "newer.pt")


class FullDisk:
    """`open` for the checkpoint writer: the first write succeeds partly, then the disk is full."""

    def __init__(self, fail_on: str):
        self.fail_on, self.failures = fail_on, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if self.fail_on not in str(path):
            return handle
        self.failures += 1
        real_write = handle.write

        def write(data):
            real_write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = write
        return handle


def test_disk_full_while_saving_a_checkpoint(archive, tmp_path, monkeypatch, capsys, finished_run):
    full = FullDisk(".last.pt.")
    calls = {"n": 0}
    real_save = checkpoint.save_checkpoint

    def save_then_fill(path, state):  # the disk fills up after the first epoch's checkpoints
        calls["n"] += path.name == "last.pt"
        if calls["n"] == 2:
            monkeypatch.setattr(checkpoint, "open", full, raising=False)
        return real_save(path, state)

    monkeypatch.setattr("cudacnn.train.trainer.save_checkpoint", save_then_fill)
    args = train_args(archive, tmp_path, "full")
    assert main(args) == 2
    run = tmp_path / "runs" / "full"
    err = capsys.readouterr().err
    assert err == (f"error: no space left on device writing {run / 'checkpoints' / 'last.pt'}; free space and "
                   f"resume with `cudacnn train --resume {run}`\n")
    assert full.failures == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0  # the last good one, verified
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temporary file
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "eval.json").exists()
    for key, value in weights(finished_run).items():  # the same weights as the run that never stopped
        torch.testing.assert_close(weights(run)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("target", ["metrics.jsonl", "eval.json", "plots/curves.png", "report.html", "summary.md"])
def test_disk_full_while_writing_run_files(archive, tmp_path, monkeypatch, capsys, target):
    from matplotlib.figure import Figure

    name = pathlib.Path(target).name
    real_write_text, real_savefig = pathlib.Path.write_text, Figure.savefig

    def full(path):
        if pathlib.Path(path).name.startswith(f".{name}."):  # atomic_output's temporary file for the target
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", lambda self, *a, **k: full(self) or real_write_text(self, *a, **k))
    monkeypatch.setattr(Figure, "savefig", lambda self, path, *a, **k: full(path) or real_savefig(self, path, *a, **k))
    assert main(train_args(archive, tmp_path, "full")) == 2
    run = tmp_path / "runs" / "full"
    err = capsys.readouterr().err
    assert err == (f"error: no space left on device writing {run / target}; free space and resume with "
                   f"`cudacnn train --resume {run}`\n")
    assert load_checkpoint(run / "checkpoints" / "last.pt")  # whole and verified
    assert not list(run.rglob(".*"))  # no temporary files left
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["epoch"] == load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] + 1
    assert (run / "report.html").exists() and (run / "plots" / "curves.png").exists()


def test_resume_of_a_finished_run_says_so(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{finished_run} is finished: 3/3 epochs, test accuracy" in out
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()} == before  # nothing rewritten


def test_evaluations_are_additive(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    training = (run / "eval.json").read_bytes()
    record = json.loads(training)
    assert {"train_time_s", "device", "accuracy_without_tta"} <= record.keys()
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["evaluate", str(run), "--tta", "2", *cache]) == 0
    assert main(["evaluate", str(run / "checkpoints" / "last.pt"), *cache]) == 0
    capsys.readouterr()
    assert (run / "eval.json").read_bytes() == training  # the training's record is left as it was
    tta = json.loads((run / "evals" / "best-tta2.json").read_text())
    last = json.loads((run / "evals" / "last.json").read_text())
    assert tta["tta_level"] == 2 and tta["epoch"] == record["epoch"] and last["epoch"] == 3
    assert last["checkpoint"] == str(run / "checkpoints" / "last.pt") and last["tta_level"] == 0
    assert (run / "evals" / "best-tta2-confusion.csv").exists() and (run / "evals" / "last-confusion.png").exists()
    html = (run / "report.html").read_text()
    assert "Evaluations" in html and "best-tta2" in html and f"{100 * tta['accuracy']:.2f}%" in html
    assert f"{100 * last['accuracy']:.2f}%" in html
    # the training's own figure is still the report's headline
    assert f"test accuracy</td><td>{100 * record['accuracy']:.2f}%" in html


def test_print_config_resolves_preset_file_and_flags_then_exits(tmp_path, capsys):
    import yaml

    settings = tmp_path / "c.yaml"
    settings.write_text("epochs: 7\nkeep_best: 2\n")
    out_dir = tmp_path / "runs"
    assert main(["train", "--preset", "keras-cnn", "--config", str(settings), "--lr", "0.5", "--log", "csv",
                 "--out", str(out_dir), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["preset"], printed["model"], printed["batch_size"]) == ("keras-cnn", "simple", 32)  # preset
    assert (printed["epochs"], printed["keep_best"], printed["lr"], printed["log"]) == (7, 2, 0.5, "csv")
    assert not out_dir.exists()  # nothing trained or written


def test_help_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "--lr LR peak learning rate (default: 0.1; presets set their own)" in text
    assert "--momentum MOMENTUM SGD momentum (default: 0.9)" in text
    assert "--gpus GPUS" in text and "(default: 1)" in text


def test_the_start_line_names_seed_and_device(archive, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert main(train_args(archive, tmp_path, "seed", "--seed", "7", "--epochs", "1", quiet=False)) == 0
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training simple"))
    assert "on cpu, seed 7;" in start


def test_metrics_to_csv_and_tensorboard(archive, tmp_path):
    import csv

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(train_args(archive, tmp_path, "logs", "--epochs", "2", "--log", "tensorboard,csv")) == 0
    run = tmp_path / "runs" / "logs"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, record in zip(rows, records):
        assert float(row["train_loss"]) == pytest.approx(record["train_loss"])
        assert float(row["val_acc"]) == pytest.approx(record["val_acc"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss/train", "acc/train", "loss/val", "acc/val", "lr"} <= set(events.Tags()["scalars"])
    points = events.Scalars("loss/train")
    assert [p.step for p in points] == [1, 2]
    assert [p.value for p in points] == pytest.approx([r["train_loss"] for r in records])


def test_missing_tensorboard_is_one_line_before_anything_is_written(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    assert main(train_args(archive, tmp_path, "notb", "--log", "tensorboard")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not (tmp_path / "runs").exists()
    assert main(train_args(archive, tmp_path, "bad", "--log", "wandb")) == 2
    assert "log takes a comma-separated list of tensorboard, csv" in capsys.readouterr().err


def test_init_from_takes_the_weights_not_the_optimizer(archive, finished_run, tmp_path, capsys, caplog):
    import dataclasses

    from cudacnn.data import load_dataset
    from cudacnn.train.config import TrainConfig
    from cudacnn.train.trainer import Trainer

    dataset = load_dataset(str(archive), cache_dir=tmp_path / "cache", quiet=True)
    config = TrainConfig(model="simple", epochs=1, batch_size=8, amp="none", device="cpu", val_fraction=0.25,
                         out=str(tmp_path / "runs"), name="tuned", init_from=str(finished_run)).validate()
    trainer = Trainer(config, dataset=dataset, quiet=True)
    source = load_checkpoint(finished_run / "checkpoints" / "best.pt")["model"]  # a run folder: its best.pt
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0, msg=key)
    assert trainer.optimizer.state_dict()["state"] == {}  # the optimizer starts fresh
    fresh = Trainer(dataclasses.replace(config, init_from=None, name="fresh"), dataset=dataset, quiet=True)
    assert any(not torch.equal(v, source[k]) for k, v in fresh.model.state_dict().items())  # not by chance
    assert trainer.fit().epochs_done == 1
    # the same number of classes under other names: fine-tuning is allowed, with a warning naming both
    renamed = dataclasses.replace(dataset, classes=[f"other{i}" for i in range(dataset.num_classes)])
    with caplog.at_level("WARNING", logger="cudacnn.train.trainer"):
        Trainer(dataclasses.replace(config, name="renamed"), dataset=renamed, quiet=True)
    assert "this data's are other0" in caplog.text
    # another model's weights, a damaged file: one line each, before any run folder
    flags = train_args(archive, tmp_path, "other", "--init-from", str(finished_run))
    flags[flags.index("simple")] = "bn_dropout"
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a 'simple' model, this run trains 'bn_dropout'" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((finished_run / "checkpoints" / "best.pt").read_bytes()[:-1])
    assert main(train_args(archive, tmp_path, "bad", "--init-from", str(bad))) == 2
    assert "bad.pt is truncated" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "other").exists() and not (tmp_path / "runs" / "bad").exists()


def test_keep_best_keeps_the_top_n_by_validation_accuracy(archive, tmp_path):
    from cudacnn.train.trainer import top_epochs

    history = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.6},
               {"epoch": 4, "val_acc": 0.7}]
    assert top_epochs(history, 2) == {2, 4} and top_epochs(history, 1) == {2} and top_epochs(history, 0) == set()
    assert top_epochs([{"epoch": 1, "train_acc": 0.9}, {"epoch": 2, "train_acc": 0.8}], 1) == {1}  # no val split
    assert main(train_args(archive, tmp_path, "keep", "--epochs", "4", "--keep-best", "2")) == 0
    run = tmp_path / "runs" / "keep"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = sorted(records, key=lambda r: (-r["val_acc"], r["epoch"]))[:2]
    names = sorted(p.name for p in (run / "checkpoints").glob("best-e*.pt"))
    assert names == sorted(f"best-e{r['epoch']:03d}.pt" for r in best)
    for r in best:  # each holds its epoch's weights, verified
        assert load_checkpoint(run / "checkpoints" / f"best-e{r['epoch']:03d}.pt")["epoch"] == r["epoch"] - 1
