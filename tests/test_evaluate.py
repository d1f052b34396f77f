"""Evaluation: metrics against hand computations, evaluate() over a loader, plots, the run report, and the
evaluate / predict / report commands on a tiny image-folder data set."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from cudacnn.cli import main
from cudacnn.errors import DataError
from cudacnn.evaluate.metrics import EvalResult, confusion_matrix, evaluate, most_confused, per_class_metrics
from cudacnn.evaluate.plots import plot_confusion, plot_training_curves
from cudacnn.evaluate.report import save_evaluation, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- pure metrics

def test_confusion_matrix_by_hand():
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    cm = confusion_matrix(preds, targets, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[2, 1, 0],   # rows: true class
                                       [0, 1, 1],
                                       [1, 0, 3]])


def test_per_class_metrics_by_hand():
    cm = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    rows = per_class_metrics(cm, ["a", "b", "c"])
    # a: tp 2, predicted 3, support 3 -> P 2/3, R 2/3, F1 2/3
    # b: tp 1, predicted 2, support 2 -> P 1/2, R 1/2
    # c: tp 3, predicted 4, support 4 -> P 3/4, R 3/4
    expected = [("a", 2 / 3, 2 / 3, 3), ("b", 1 / 2, 1 / 2, 2), ("c", 3 / 4, 3 / 4, 4)]
    for row, (name, p, r, support) in zip(rows, expected):
        assert row["class"] == name and row["support"] == support
        assert row["precision"] == pytest.approx(p) and row["recall"] == pytest.approx(r)
        assert row["f1"] == pytest.approx(2 * p * r / (p + r))


def test_per_class_metrics_unequal_precision_recall_and_empty_class():
    cm = np.array([[3, 1, 0], [2, 0, 0], [0, 0, 0]])  # class b never right, class c absent
    a, b, c = per_class_metrics(cm, ["a", "b", "c"])
    assert a["precision"] == pytest.approx(3 / 5) and a["recall"] == pytest.approx(3 / 4)
    assert a["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert b == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert c["support"] == 0 and c["f1"] == 0.0


def test_most_confused_orders_off_diagonal_cells():
    cm = np.array([[50, 7, 1], [2, 40, 9], [0, 0, 30]])
    pairs = most_confused(cm, ["a", "b", "c"], top=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("b", "c", 9), ("a", "b", 7), ("b", "a", 2)]
    assert pairs[0]["fraction"] == pytest.approx(9 / 51)
    assert most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


# -- evaluate() over a loader

class LookupModel(nn.Module):
    """Predicts the class written in pixel (0, 0) of channel 0, with logit margin 10."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return self.scale * nn.functional.one_hot(x[:, 0, 0, 0].round().long(), self.k).float()


def lookup_batches(preds, targets, batch=4):
    images = torch.zeros(len(preds), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32)
    labels = torch.tensor(targets)
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, len(preds), batch)]


def test_evaluate_accuracy_loss_and_confusion_by_hand():
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    model = LookupModel(3).train()
    result = evaluate(model, lookup_batches(preds, targets), 3, classes=["a", "b", "c"])
    assert model.training  # mode restored
    assert result.accuracy == pytest.approx(6 / 9)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(preds, targets, 3))
    # cross entropy with logits (10, 0, 0): right -> log(1 + 2e^-10), wrong -> 10 + log(1 + 2e^-10)
    base = math.log(1 + 2 * math.exp(-10))
    assert result.loss == pytest.approx(base + 10 * 3 / 9, rel=1e-5)
    assert result.most_confused[0]["count"] == 1
    assert [r["class"] for r in result.per_class] == ["a", "b", "c"]


def test_evaluate_with_tta_averages_mirrored_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    images, labels = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    with torch.no_grad():
        logits = 0.5 * (model(images) + model(images.flip(-1)))
    result = evaluate(model, [(images[:5], labels[:5]), (images[5:], labels[5:])], 3, tta_level=1)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(logits.argmax(1), labels, 3))
    assert result.loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result.tta_level == 1


def test_eval_result_round_trips_through_json():
    cm = np.array([[5, 1], [2, 4]])
    result = EvalResult.from_confusion(cm, 0.5, ["x", "y"])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["accuracy"] == pytest.approx(9 / 12) and data["num_samples"] == 12
    back = EvalResult.from_dict(data)
    np.testing.assert_array_equal(back.confusion, cm)
    assert back.per_class == result.per_class


# -- plots and report

RECORDS = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 + 0.1 * e, "val_loss": 2.2 / e,
            "val_acc": 0.25 + 0.1 * e, "lr": 0.01 / e, "epoch_time_s": 1.5, "images_per_s": 1000.0 * e}
           for e in (1, 2, 3)]


def test_plots_are_pngs(tmp_path):
    curves = plot_training_curves(RECORDS, tmp_path / "a" / "curves.png")
    heat = plot_confusion(np.array([[5, 1], [2, 4]]), ["cat", "dog"], tmp_path / "heat.png")
    for path in (curves, heat):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    # records without validation (no val split) still plot
    assert plot_training_curves([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}], tmp_path / "c.png").exists()


def make_run(run, with_eval=True):
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "simple", "preset": "keras-cnn",
                                                     "optimizer": {"name": "adam", "lr": 0.001}}))
    lines = [json.dumps(r) for r in RECORDS] + ['{"epoch": 4, "train_lo']  # a torn last line
    (run / "metrics.jsonl").write_text("\n".join(lines))
    if with_eval:
        cm = np.array([[40, 5, 5], [10, 35, 5], [0, 0, 50]])
        save_evaluation(EvalResult.from_confusion(cm, 0.61, ["cat", "dog", "frog"]), run)


def test_report_is_self_contained(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    html_path, md_path = write_report(run)
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 2  # curves + confusion, embedded
    assert "src='plots/" not in html and "src=\"plots/" not in html
    assert "83.33%" in html  # test accuracy 125/150
    assert "55.00% (epoch 3)" in html  # best val accuracy
    assert "keras-cnn" in html and "optimizer.lr" in html
    assert "dog" in html and "cat" in html
    md = md_path.read_text()
    assert "83.33%" in md and "](plots/curves.png)" in md and "](plots/confusion.png)" in md
    assert (run / "plots" / "curves.png").exists()


def test_report_without_eval_and_bad_folders(tmp_path):
    run = tmp_path / "run"
    make_run(run, with_eval=False)
    html = write_report(run)[0].read_text()
    assert html.count("data:image/png;base64,") == 1 and "test accuracy" not in html
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.yaml"):
        write_report(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_save_evaluation_files(tmp_path):
    cm = np.array([[3, 1], [0, 4]])
    paths = save_evaluation(EvalResult.from_confusion(cm, 0.2, ["cat", "dog"]), tmp_path, {"epoch": 7})
    np.testing.assert_array_equal(np.load(paths["npy"]), cm)
    assert paths["csv"].read_text().splitlines() == ["true\\predicted,cat,dog", "cat,3,1", "dog,0,4"]
    data = json.loads(paths["json"].read_text())
    assert data["epoch"] == 7 and data["accuracy"] == pytest.approx(7 / 8)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in paths.values())  # readable outputs


# -- commands on a tiny data set and checkpoint

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An image-folder data set (3 classes, 4 test images each) and a run folder with a checkpoint."""
    from cudacnn.models import create_model
    from cudacnn.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    test_images = []
    for split, n in (("train", 2), ("test", 4)):
        for name in CLASSES:
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                if split == "test":
                    test_images.append(pixels)
    torch.manual_seed(0)
    model = create_model("simple", num_classes=3)
    run = root / "run"
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    # Untrained, the net gives every noise image one class. Centre its logits over the test images and scale
    # them up: its predictions then spread over the classes (right and wrong), and TTA's views change some.
    with torch.no_grad():
        features = nn.Sequential(*list(model)[:-1])(normalized(np.stack(test_images), mean, std))
        logits = features @ model[-1].weight.T
        model[-1].weight.mul_(100.0)
        model[-1].bias.copy_(-100.0 * logits.mean(0))
    save_checkpoint(run / "checkpoints" / "best.pt", {
        "model_name": "simple", "model_kwargs": {}, "classes": CLASSES, "mean": mean, "std": std,
        "model": model.state_dict(), "epoch": 0, "config": {"data": str(root / "data"), "model": "simple"}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return {"root": root, "run": run, "model": model.eval(), "mean": mean, "std": std}


def normalized(images, mean, std) -> torch.Tensor:
    """uint8 NHWC images normalized here by hand (not by the code under test): (x / 255 - mean) / std, NCHW."""
    x = (images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def reference_logits(tiny_run, images, tta_level=0):
    """Logits of the checkpoint's model on uint8 NHWC images (normalized by hand), under TTA `tta_level`."""
    from cudacnn.evaluate.tta import predict_tta

    return predict_tta(tiny_run["model"], normalized(images, tiny_run["mean"], tiny_run["std"]), tta_level)


def reference_predictions(tiny_run, images):
    """Softmax of the checkpoint's model on uint8 NHWC images, normalized here by hand."""
    with torch.no_grad():
        return torch.softmax(tiny_run["model"](normalized(images, tiny_run["mean"], tiny_run["std"])), 1).numpy()


def test_evaluate_command_writes_outputs_and_report(tiny_run, capsys):
    from cudacnn.data import load_dataset

    run, cache = tiny_run["run"], tiny_run["root"] / "cache"
    assert main(["evaluate", str(run), "--cache-dir", str(cache), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    data = json.loads((run / "evals" / "best.json").read_text())
    assert data["checkpoint"] == str(run / "checkpoints" / "best.pt") and data["epoch"] == 1  # epochs count from 1
    test = load_dataset(tiny_run["root"] / "data", cache_dir=cache, quiet=True).test
    probs = reference_predictions(tiny_run, test.images)
    expected = confusion_matrix(probs.argmax(1), test.labels, 3)
    np.testing.assert_array_equal(np.array(data["confusion"]), expected)
    assert data["accuracy"] == pytest.approx(np.trace(expected) / 12)
    assert f"test accuracy {100 * data['accuracy']:.2f}%" in out
    assert "Per-class metrics (test)" in out
    # per class, precision = diagonal / predicted (column) total and recall = diagonal / true (row) total,
    # computed here from the reference confusion matrix; the terminal table's row shows them in that order
    diagonal = np.diag(expected)
    precision = diagonal / np.maximum(expected.sum(0), 1)
    recall = diagonal / np.maximum(expected.sum(1), 1)
    # the fixture's predictions spread over the classes, so precision, recall and diagonal / total all differ
    assert np.count_nonzero(expected.sum(0)) >= 2 and diagonal.sum() > 0, expected
    assert not np.allclose(precision, recall) and not np.allclose(precision, diagonal / expected.sum()), expected
    for k, row in enumerate(data["per_class"]):
        assert row["precision"] == pytest.approx(precision[k]) and row["recall"] == pytest.approx(recall[k])
        line = next(line for line in out.splitlines() if re.search(rf"\W{row['class']}\W", line))
        assert re.search(rf"{row['class']}\W+{precision[k]:.3f}\W+{recall[k]:.3f}\W", line), line
    for name in ("evals/best-confusion.csv", "evals/best-confusion.npy", "evals/best-confusion.png",
                 "report.html", "summary.md"):
        assert (run / name).exists(), name
    assert not (run / "eval.json").exists()  # the training's record is not evaluate's to write


def test_evaluate_command_tta_levels(tiny_run, capsys):
    from cudacnn.data import load_dataset

    run, cache = tiny_run["run"], tiny_run["root"] / "cache"
    assert main(["evaluate", str(run), "--cache-dir", str(cache), "--device", "cpu", "--tta", "3"]) == 0
    data = json.loads((run / "evals" / "best-tta3.json").read_text())
    assert data["tta_level"] == 3
    test = load_dataset(tiny_run["root"] / "data", cache_dir=cache, quiet=True).test
    labels = torch.from_numpy(np.asarray(test.labels, dtype=np.int64))
    # evaluate's wiring against predict_tta's views (tests/test_fast_tta.py checks those views by hand)
    logits = {level: reference_logits(tiny_run, test.images, level) for level in (0, 1, 2, 3)}
    expected = confusion_matrix(logits[3].argmax(1).numpy(), test.labels, 3)
    np.testing.assert_array_equal(np.array(data["confusion"]), expected)
    assert data["accuracy"] == pytest.approx(np.trace(expected) / 12)
    losses = {level: nn.functional.cross_entropy(z, labels).item() for level, z in logits.items()}
    assert data["loss"] == pytest.approx(losses[3], rel=1e-5)
    # level 3 is told apart from the others: by the confusion matrix (0, 1) or the loss (all)
    assert all(not np.array_equal(confusion_matrix(logits[k].argmax(1).numpy(), test.labels, 3), expected)
               for k in (0, 1))
    assert all(abs(losses[k] - losses[3]) > 1e-3 * losses[3] for k in (0, 1, 2)), losses
    assert main(["evaluate", str(run), "--cache-dir", str(cache), "--device", "cpu", "--tta", "4"]) == 2
    assert "--tta takes a level in (0, 1, 2, 3), got 4" in capsys.readouterr().err


def test_evaluate_command_refuses_other_classes(tiny_run, tmp_path, capsys):
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            (other / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(other / split / name / "0.png")
    code = main(["evaluate", str(tiny_run["run"] / "checkpoints" / "best.pt"), "--data", str(other),
                 "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2 and "differ from the checkpoint's" in capsys.readouterr().err


def test_predict_command(tiny_run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    assert main(["predict", str(tiny_run["run"]), *map(str, paths), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reference_predictions(tiny_run, pixels)
    assert [line["image"] for line in lines] == [str(p) for p in paths]  # one line per image, in order
    for line, probs in zip(lines, expected):
        got = np.array([line["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert line["class"] == CLASSES[int(probs.argmax())]
    assert main(["predict", str(tiny_run["run"]), str(paths[0])]) == 0
    assert CLASSES[int(expected[0].argmax())] in capsys.readouterr().out


def test_predict_takes_any_size_and_mode(tiny_run, tmp_path, capsys):
    """A greyscale image predicts as its grey RGB; a large non-square photo (JPEG), an RGBA and a palette PNG
    predict as the training decoder's 32x32 RGB of them, its centre square with the outer bands cut."""
    from cudacnn.data.image_folder import fit_image

    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    photo[:50] = photo[-50:] = 255  # bands outside the centre square: they must not matter
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    paths = {"grey.png": Image.fromarray(grey, "L"), "photo.jpg": Image.fromarray(photo),
             "rgba.png": Image.fromarray(rgba, "RGBA"), "palette.png": Image.fromarray(photo[:64, :48]).quantize(16)}
    for name, image in paths.items():
        image.save(tmp_path / name)
    files = [str(tmp_path / name) for name in paths]
    assert main(["predict", str(tiny_run["run"]), *files, "--json"]) == 0
    got = np.array([[line["probabilities"][c] for c in CLASSES]
                    for line in map(json.loads, capsys.readouterr().out.splitlines())])
    with Image.open(tmp_path / "photo.jpg") as jpg:
        jpg.draft("RGB", (32, 32))
        photo_32 = fit_image(jpg.convert("RGB"), 32)
    assert photo_32.shape == (32, 32, 3) and photo_32.mean() < 200  # noise, not the white bands
    expected = [np.repeat(grey[..., None], 3, axis=2), photo_32, fit_image(Image.fromarray(rgba[..., :3]), 32),
                fit_image(Image.open(tmp_path / "palette.png"), 32)]
    np.testing.assert_allclose(got, reference_predictions(tiny_run, np.stack(expected)), atol=1e-5)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_device_that_is_not_one(tiny_run, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the name is checked before any GPU question
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(path)
    extra = [str(path)] if command == "predict" else []
    assert main([command, str(tiny_run["run"]), *extra, "--device", "foo"]) == 2
    assert "--device foo is not a device name; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_evaluate_out_that_is_a_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "taken.txt"
    out.write_text("x")
    assert main(["evaluate", str(tiny_run["run"]), "--out", str(out), "--device", "cpu"]) == 2
    assert f"--out {out} is a file; name a folder" in capsys.readouterr().err


def test_an_unforeseen_path_error_is_one_line(monkeypatch, capsys):
    from cudacnn.evaluate import commands

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/report.html")

    monkeypatch.setattr(commands, "run_report", denied)
    assert main(["report", "anything"]) == 2
    assert capsys.readouterr().err == ("error: /some/report.html: Permission denied; "
                                       "check that path and its permissions\n")


def test_predict_names_a_folder_and_a_bomb(tiny_run, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(tiny_run["run"]), str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; predict takes image files" in capsys.readouterr().err
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(path)
    from cudacnn.data import image_folder

    monkeypatch.setattr(image_folder, "MAX_PIXELS", 1000)
    assert main(["predict", str(tiny_run["run"]), str(path)]) == 2
    assert f"{path} is 32x32 (1,024 pixels), over the limit of 1,000 (a decompression bomb" in capsys.readouterr().err


def test_report_command(tiny_run, tmp_path, capsys):
    run = tmp_path / "r"
    make_run(run)
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out and (run / "summary.md").exists()


def test_curve_panels_keep_their_tick_labels_apart():
    """The learning-rate panel's y tick labels (long numbers like 0.0015) stay clear of the accuracy panel."""
    import matplotlib.pyplot as plt

    from cudacnn.evaluate.plots import training_curves_figure

    records = [{"epoch": e, "train_loss": 2 / e, "train_acc": 1 - 1 / (e + 1), "val_acc": 1 - 1.2 / (e + 1),
                "lr": 0.00213 * (1 - abs(e - 20) / 20) + 1e-6} for e in range(1, 41)]
    fig = training_curves_figure(records)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        loss, accuracy, lr = fig.axes[:3]
        for left, right in ((loss, accuracy), (accuracy, lr)):
            right_edge = left.get_tightbbox(renderer).x1  # the panel with its legend and labels
            labels = [t for t in right.get_yticklabels() if t.get_text()]
            assert labels and min(t.get_window_extent(renderer).x0 for t in labels) > right_edge
    finally:
        plt.close(fig)


def test_report_names_versions_device_and_date(tmp_path):
    import torch

    from cudacnn import __version__

    run = tmp_path / "run"
    make_run(run, with_eval=False)
    cm = np.array([[4, 1], [0, 5]])
    save_evaluation(EvalResult.from_confusion(cm, 0.3, ["cat", "dog"]), run,
                    {"device": "NVIDIA H100 80GB HBM3", "cudacnn_version": "0.1.0", "torch_version": "2.11.0",
                     "cuda_version": "12.8", "date": "2026-12-06T14:00:00+00:00"})
    html, md = (p.read_text() for p in write_report(run))
    for text in (html, md):
        assert "NVIDIA H100 80GB HBM3" in text and "2026-12-06T14:00:00+00:00" in text
        assert "cudacnn 0.1.0, torch 2.11.0, CUDA 12.8" in text  # the training's software
        assert f"by cudacnn {__version__}, torch {torch.__version__}" in text  # and the report's own


@pytest.mark.slow
def test_report_screenshot_in_headless_chromium(tmp_path):
    """scripts/screenshot_report.py renders the report: the page is not blank and shows the plots' colours."""
    import importlib.util

    from PIL import Image

    script = Path(__file__).resolve().parent.parent / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", script)
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    if shot.find_chromium() is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    run = tmp_path / "run"
    make_run(run)
    write_report(run)
    png = shot.screenshot(run / "report.html", tmp_path / "report.png", width=1000, height=1600)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (1600, 1000, 3)
    blue = np.array([31, 119, 180])  # matplotlib's tab:blue, the training curve: the embedded plots were drawn
    assert (np.abs(image.astype(int) - blue).sum(-1) < 30).sum() > 100
    assert (image.sum(-1) < 200).sum() > 1000  # dark text
