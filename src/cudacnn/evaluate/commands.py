"""`cudacnn evaluate`, `cudacnn predict`, `cudacnn export` and `cudacnn report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cudacnn.errors import ConfigError, DataError
from cudacnn.evaluate.tta import TTA_LEVELS
from cudacnn.train import setup


def add_commands(subparsers) -> None:
    ev = subparsers.add_parser("evaluate", help="test-set accuracy, per-class metrics and confusion matrix; "
                               "written to RUN/evals/ beside the training's eval.json, which stays")
    ev.add_argument("checkpoint", help="checkpoint file, or a run folder (uses checkpoints/best.pt)")
    ev.add_argument("--data", help="data source (default: the one the run trained on)")
    ev.add_argument("--tta", type=int, nargs="?", const=2, default=0, metavar="LEVEL",
                    help="test-time augmentation: 1 = mirror, 2 = mirror + 1-pixel shifts (default with --tta), "
                         "3 = mirror + all four diagonal shifts")
    ev.add_argument("--out", type=Path, help="folder whose evals/ gets the results (default: the checkpoint's run "
                    "folder)")
    ev.add_argument("--batch-size", type=int, default=1000)
    ev.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ev.add_argument("--cache-dir", type=Path, help="where decoded data caches live")
    ev.set_defaults(func=run_evaluate)

    pr = subparsers.add_parser("predict", help="class and probabilities for image files (any size or mode: "
                               "resized and cropped to the model's input as in training)")
    pr.add_argument("checkpoint", help="checkpoint file, or a run folder")
    pr.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--top", type=int, default=3, help="how many classes to show per image (default 3)")
    pr.add_argument("--json", action="store_true", help="print one JSON object per image with all probabilities")
    pr.add_argument("--device", help="cuda or cpu (default: cpu)")
    pr.set_defaults(func=run_predict)

    ex = subparsers.add_parser("export", help="export a checkpoint to ONNX (checked against onnxruntime) "
                               "and/or safetensors (weights and metadata, no pickle)")
    ex.add_argument("checkpoint", help="checkpoint file, or a run folder")
    ex.add_argument("--onnx", type=Path, metavar="FILE", help="where to write the .onnx file")
    ex.add_argument("--safetensors", type=Path, metavar="FILE", help="where to write the .safetensors file")
    ex.set_defaults(func=run_export)

    rp = subparsers.add_parser("report", help="write RUN/report.html (self-contained) and RUN/summary.md")
    rp.add_argument("run", type=Path, help="run folder written by `cudacnn train`")
    rp.set_defaults(func=run_report)


def pick_device(name: str | None, default_cuda: bool = True) -> torch.device:
    """No --device: the GPU if there is one (or the CPU when `default_cuda` is off); else as the trainer."""
    if name is None:
        return torch.device("cuda" if default_cuda and torch.cuda.is_available() else "cpu")
    return setup.pick_device(name)


def run_folder_of(checkpoint: str | Path) -> Path:
    """RUN for RUN/checkpoints/x.pt or RUN itself; otherwise the checkpoint's own folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def data_source_of(config: dict) -> str | None:
    """The data source a run trained on, from its saved config (TrainConfig.data)."""
    data = (config or {}).get("data")
    return str(data) if data else None


def evaluation_name(checkpoint: Path, tta_level: int, data: str | None) -> str:
    """evals/ file name of an evaluation: the checkpoint, then each setting that differs from training's."""
    name = checkpoint.stem + (f"-tta{tta_level}" if tta_level else "")
    if data:
        name += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).name.removesuffix(".gz").removesuffix(".tar"))[:40]
    return name


def run_evaluate(args) -> int:
    from cudacnn.data import GpuLoader, load_dataset
    from cudacnn.evaluate.metrics import evaluate
    from cudacnn.evaluate.predict import image_size_of
    from cudacnn.evaluate.report import environment, save_evaluation, write_report
    from cudacnn.train.checkpoint import model_from_checkpoint, run_checkpoint

    if args.tta not in TTA_LEVELS:
        raise ConfigError(f"--tta takes a level in {TTA_LEVELS}, got {args.tta}")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; name a folder for the evaluation outputs")
    device = pick_device(args.device)
    chosen = run_checkpoint(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint)
    model, ckpt = model_from_checkpoint(chosen, device=device)
    source = args.data or data_source_of(ckpt.get("config", {}))
    dataset = load_dataset(source, cache_dir=args.cache_dir, image_size=image_size_of(ckpt))
    classes = list(ckpt["classes"])
    if list(dataset.classes) != classes:
        raise DataError(f"the data's classes {dataset.classes} differ from the checkpoint's {classes}; "
                        "evaluate on the data set the model was trained on (--data)")
    from cudacnn.data.split import check_test_files

    check_test_files(run_folder_of(args.checkpoint), dataset)
    loader = GpuLoader(dataset.test, args.batch_size, device, mean=ckpt["mean"], std=ckpt["std"],
                       dtype=torch.float32)
    result = evaluate(model, loader, len(classes), device=device, tta_level=args.tta, classes=classes)

    out = args.out or run_folder_of(args.checkpoint)
    extra = {"checkpoint": str(chosen), "data": dataset.source or str(source),
             "epoch": ckpt["epoch"] + 1, "model_name": ckpt.get("model_name"), "device": setup.device_name(device),
             "batch_size": args.batch_size, **environment()}
    paths = save_evaluation(result, out, extra, name=evaluation_name(chosen, args.tta, args.data))
    console = Console()
    print_evaluation(result, console)
    console.print(f"wrote {paths['json']}, {paths['csv']}, {paths['npy']}, {paths['plot']}")
    if (out / "metrics.jsonl").exists():  # a run folder: refresh its report with the new numbers
        html_path, _ = write_report(out)
        console.print(f"updated {html_path}")
    return 0


def print_evaluation(result, console: Console) -> None:
    from cudacnn.evaluate.report import evaluation_tables

    tta = f" (TTA level {result.tta_level})" if result.tta_level else ""
    console.print(f"[bold]test accuracy {100 * result.accuracy:.2f}%[/]{tta}, loss {result.loss:.4f}, "
                  f"{result.num_samples} images")
    for title, header, rows in evaluation_tables(result.to_dict()):  # the same tables as report.html
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*map(str, row))
        console.print(table)


def run_predict(args) -> int:
    import numpy as np

    from cudacnn.evaluate.predict import check_image_path, image_size_of, predict_probabilities, read_image
    from cudacnn.train.checkpoint import model_from_checkpoint

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    for path in args.images:  # a missing file is reported before the model is loaded
        check_image_path(path)
    model, ckpt = model_from_checkpoint(args.checkpoint, device=pick_device(args.device, default_cuda=False))
    size = image_size_of(ckpt)
    images = np.stack([read_image(p, size) for p in args.images])
    classes = list(ckpt["classes"])
    probs = predict_probabilities(model, images, ckpt["mean"], ckpt["std"])
    if args.json:
        for path, p in zip(args.images, probs):
            print(json.dumps({"image": str(path), "class": classes[int(p.argmax())],
                              "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)}}))
        return 0
    top = min(args.top, len(classes))
    table = Table("image", "class", "probability", *(f"#{i}" for i in range(2, top + 1)))
    for path, p in zip(args.images, probs):
        order = np.argsort(-p)[:top]
        table.add_row(str(path), classes[order[0]], f"{p[order[0]]:.3f}",
                      *(f"{classes[i]} {p[i]:.3f}" for i in order[1:]))
    Console().print(table)
    return 0


def run_export(args) -> int:
    from cudacnn.evaluate.export import PARITY_TOLERANCE, export_onnx, export_safetensors
    from cudacnn.evaluate.predict import image_size_of
    from cudacnn.train.checkpoint import model_from_checkpoint, stored_model_kwargs

    if not (args.onnx or args.safetensors):
        raise ConfigError("export needs --onnx FILE and/or --safetensors FILE")
    for flag, path, ext in (("--onnx", args.onnx, ".onnx"), ("--safetensors", args.safetensors, ".safetensors")):
        if path and (path.is_dir() or (path.parent.exists() and not path.parent.is_dir())):
            raise ConfigError(f"{flag} {path} cannot be written as a file; name a {ext} file in a folder")
    model, ckpt = model_from_checkpoint(args.checkpoint, device="cpu")
    size = image_size_of(ckpt)
    metadata = {"model_name": ckpt["model_name"], "classes": list(ckpt["classes"]),
                "mean": list(ckpt["mean"]), "std": list(ckpt["std"]), "image_size": size,
                "input": f"float32 NCHW {size}x{size} RGB, (x/255 - mean) / std"}
    if args.safetensors:
        count = export_safetensors(model, args.safetensors,
                                   {**metadata, "model_kwargs": stored_model_kwargs(ckpt), "epoch": ckpt["epoch"] + 1})
        print(f"wrote {args.safetensors}: {count} tensors, read back and checked")
    if args.onnx:
        diff = export_onnx(model, args.onnx, metadata, image_size=size)
        print(f"wrote {args.onnx}; onnxruntime parity: max abs difference {diff:.2e} (bound {PARITY_TOLERANCE:g})")
    return 0


def run_report(args) -> int:
    from cudacnn.evaluate.report import write_report

    html_path, md_path = write_report(args.run)
    print(f"wrote {html_path} and {md_path}")
    return 0
