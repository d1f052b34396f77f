"""`write_report(run_dir)`: a self-contained HTML page (plots embedded as base64 PNG) and a markdown summary
from a run folder's config.yaml, metrics.jsonl, eval.json and plots/."""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from cudacnn.errors import DataError
from cudacnn.atomic import atomic_output, write_text_atomic
from cudacnn.evaluate.plots import plot_confusion, plot_training_curves
from cudacnn.tables import fmt, md_table


EVALS = "evals"  # a run folder's later evaluations, one JSON file each


def environment() -> dict:
    """What produced a result: versions and the time (UTC); saved with every evaluation."""
    import torch

    from cudacnn import __version__

    return {"cudacnn_version": __version__, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def software(record: dict) -> str:
    cuda = f"CUDA {record['cuda_version']}" if record.get("cuda_version") else "no CUDA (CPU build of torch)"
    return f"cudacnn {record.get('cudacnn_version', '?')}, torch {record.get('torch_version', '?')}, {cuda}"


def read_evaluations(run: Path) -> list[tuple[str, dict]]:
    """(name, contents) of RUN/evals/*.json, oldest first; unreadable files are skipped."""
    found = []
    for path in sorted((run / EVALS).glob("*.json")) if (run / EVALS).is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "accuracy" in data:
            found.append((path.stem, data))
    return sorted(found, key=lambda item: (str(item[1].get("date", "")), item[0]))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summarize(config: dict, records: list[dict], evaluation: dict | None) -> dict[str, str]:
    """The headline facts, as display strings, in display order."""
    summary = {}
    for key in ("preset", "model", "data"):
        if config.get(key) not in (None, ""):
            summary[key] = str(config[key])
    if records:
        summary["epochs"] = str(max(r.get("epoch", 0) for r in records))
        with_val = [r for r in records if r.get("val_acc") is not None]
        if with_val:
            best = max(with_val, key=lambda r: r["val_acc"])
            summary["best val accuracy"] = f"{100 * best['val_acc']:.2f}% (epoch {best.get('epoch')})"
        times = [r["epoch_time_s"] for r in records if r.get("epoch_time_s") is not None]
        if times:
            summary["training time"] = f"{sum(times):.1f} s"
        speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
        if speeds:
            summary["throughput"] = f"{sum(speeds) / len(speeds):,.0f} images/s (mean over epochs)"
    if evaluation:
        tta = f", TTA level {evaluation['tta_level']}" if evaluation.get("tta_level") else ""
        summary["test accuracy"] = f"{100 * evaluation['accuracy']:.2f}%{tta}"
        summary["test loss"] = f"{evaluation['loss']:.4f}"
        summary["test images"] = str(evaluation.get("num_samples", ""))
        if evaluation.get("device"):
            summary["device"] = str(evaluation["device"])
        if evaluation.get("torch_version"):
            summary["software"] = software(evaluation)
        if evaluation.get("date"):
            summary["evaluated"] = str(evaluation["date"])
    return summary


PLOT_ORDER = ["curves.png", "confusion.png"]


def ensure_plots(run: Path, records: list[dict], evaluation: dict | None) -> list[Path]:
    """Draw the standard plots the trainer or `evaluate` have not drawn yet; return all PNGs in plots/."""
    plots = run / "plots"
    if records and not (plots / "curves.png").exists():
        plot_training_curves(records, plots / "curves.png")
    if evaluation and not (plots / "confusion.png").exists():
        plot_confusion(evaluation["confusion"], evaluation["classes"], plots / "confusion.png")
    found = sorted(plots.glob("*.png")) if plots.is_dir() else []
    return sorted(found, key=lambda p: (PLOT_ORDER.index(p.name) if p.name in PLOT_ORDER else len(PLOT_ORDER), p.name))


# -- rendering

def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def evaluation_tables(evaluation: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of an evaluation's per-class metrics and most confused pairs (EvalResult.to_dict());
    shared by the report and `cudacnn evaluate`'s terminal output."""
    out = [("Per-class metrics (test)", ["class", "precision", "recall", "F1", "support"],
            [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
             for c in evaluation["per_class"]])]
    if evaluation.get("most_confused"):
        out.append(("Most confused pairs", ["true", "predicted as", "count", "% of true class"],
                    [[p["true"], p["predicted"], p["count"], f"{100 * p['fraction']:.1f}"]
                     for p in evaluation["most_confused"]]))
    return out


def evaluations_table(evaluations: list[tuple[str, dict]]) -> tuple[str, list[str], list[list]]:
    rows = [[name, Path(str(e.get("checkpoint", ""))).name, e.get("epoch", ""), e.get("tta_level") or "none",
             e.get("data", ""), f"{100 * e['accuracy']:.2f}%", fmt(e.get("loss", "")), e.get("num_samples", ""),
             e.get("device", ""), e.get("date", "")] for name, e in evaluations]
    return ("Evaluations (cudacnn evaluate; files in evals/)",
            ["name", "checkpoint", "epoch", "TTA", "data", "accuracy", "loss", "images", "device", "date"], rows)


def sections(config: dict, records: list[dict], evaluation: dict | None,
             evaluations: list[tuple[str, dict]] = ()) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) for every table in the report."""
    out = [("Summary", ["", "value"], [[k, v] for k, v in summarize(config, records, evaluation).items()])]
    if evaluations:
        out.append(evaluations_table(evaluations))
    if evaluation:
        out += evaluation_tables(evaluation)
    if records:
        keys = [k for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                            "images_per_s") if any(k in r for r in records)]
        out.append(("Epochs", keys, [[fmt(r.get(k, "")) for k in keys] for r in records]))
    if config:
        out.append(("Configuration", ["key", "value"], [[k, fmt(v)] for k, v in flatten(config).items()]))
    return out


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}.meta{color:#666}"""


def written_by() -> str:
    env = environment()
    return f"Report written {env['date']} by {software(env)}."


def render_html(title: str, tables, plots: list[Path]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{html.escape(written_by())}</p>"]
    for i, (name, header, rows) in enumerate(tables):
        parts.append(f"<h2>{html.escape(name)}</h2>{html_table(header, rows)}")
        if i == 0:  # plots right after the summary
            for png in plots:
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                parts.append(f"<h3>{html.escape(png.stem.replace('_', ' '))}</h3>"
                             f"<img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, tables, plots: list[Path], run: Path) -> str:
    parts = [f"# {title}", written_by()]
    for i, (name, header, rows) in enumerate(tables):
        parts.append(f"## {name}\n\n{md_table(header, rows)}")
        if i == 0:
            parts += [f"![{png.stem}]({png.relative_to(run).as_posix()})" for png in plots]
    return "\n\n".join(parts) + "\n"


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/summary.md; returns their paths."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist; pass the folder `cudacnn train` wrote (e.g. runs/NAME)")
    config_path, eval_path = run / "config.yaml", run / "eval.json"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config = config if isinstance(config, dict) else {}
    records = read_metrics(run / "metrics.jsonl")
    evaluation = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.exists() else None
    if not (config or records or evaluation or (run / EVALS).is_dir()):
        raise DataError(f"{run} has no config.yaml, metrics.jsonl or eval.json; is it a cudacnn run folder?")
    evaluations = read_evaluations(run)
    plots = ensure_plots(run, records, evaluation)
    tables = sections(config, records, evaluation, evaluations)
    title = f"cudacnn run: {run.resolve().name}"
    html_path = write_text_atomic(run / "report.html", render_html(title, tables, plots))
    md_path = write_text_atomic(run / "summary.md", render_markdown(title, tables, plots, run))
    return html_path, md_path


def save_evaluation(result, out_dir: str | Path, extra: dict | None = None, name: str | None = None) -> dict[str, Path]:
    """Write an EvalResult as eval.json, confusion.csv (labelled), confusion.npy and plots/confusion.png: the
    training's own record. With `name` (a later `cudacnn evaluate`), as evals/NAME.json and
    evals/NAME-confusion.{csv,npy,png} instead, beside the training's, which stay as they are."""
    out = Path(out_dir)
    if name:
        paths = {"json": out / EVALS / f"{name}.json", "csv": out / EVALS / f"{name}-confusion.csv",
                 "npy": out / EVALS / f"{name}-confusion.npy", "plot": out / EVALS / f"{name}-confusion.png"}
    else:
        paths = {"json": out / "eval.json", "csv": out / "confusion.csv", "npy": out / "confusion.npy",
                 "plot": out / "plots" / "confusion.png"}
    write_text_atomic(paths["json"], json.dumps({**result.to_dict(), **(extra or {})}, indent=1) + "\n")
    header = "true\\predicted," + ",".join(result.classes)
    rows = [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(result.classes, result.confusion)]
    write_text_atomic(paths["csv"], "\n".join([header, *rows]) + "\n")
    with atomic_output(paths["npy"], ".npy") as tmp:
        np.save(tmp, result.confusion)
    plot_confusion(result.confusion, result.classes, paths["plot"])
    return paths
