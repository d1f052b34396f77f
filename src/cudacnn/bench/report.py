"""The showing half of `cudacnn bench`: one JSON document per suite, rendered as a terminal table,
a markdown table and a PNG bar chart of speedups, and compared across machines.

JSON schema (version 1):

    {"schema": "cudacnn.bench", "version": 1,
     "suite": "ops" | "train" | "loader" | "kernels" | ...,
     "command": "cudacnn bench ops ...",          # how to reproduce it
     "environment": {...},                        # harness.environment(): GPU, driver, CUDA, torch, CPU, date
     "config": {...},                             # the options the suite ran with
     "results": [row, ...]}

A measured row compares labelled timings of one thing; the first label is the baseline, the last the
candidate, and speedup = baseline median / candidate median (null when only one side ran):

    {"name": "matmul 1024x1024 fp32", "group": "matmul",
     "measurements": {"cpu": {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats",
                              optional "accuracy" (0..1), optional "note"}, "cuda": {...}},
     "speedup": 41.2, "info": {...}}

Rows another module produces in its own shape (the kernels suite) are kept as they are: any dict with a
"name"; numeric fields are shown as columns, and a numeric "speedup" field is plotted."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cudacnn.atomic import write_text_atomic
from cudacnn.bench.harness import Stats, environment
from cudacnn.errors import ConfigError
from cudacnn.tables import fmt, md_table

SCHEMA = "cudacnn.bench"
SCHEMA_VERSION = 1
STAT_KEYS = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats")


# -- building documents
def measurement(stats: Stats, **extra) -> dict:
    return {**stats.to_dict(), **{k: v for k, v in extra.items() if v is not None}}


def result_row(name: str, group: str, measurements: dict[str, dict], **info) -> dict:
    """A measured row; speedup = first label's median / last label's median."""
    labels = list(measurements)
    speedup = None
    if len(labels) >= 2:
        base, cand = measurements[labels[0]]["median_ms"], measurements[labels[-1]]["median_ms"]
        speedup = base / cand if cand > 0 else None
    return {"name": name, "group": group, "measurements": measurements, "speedup": speedup, "info": info}


def make_document(suite: str, results: list[dict], config: dict, command: str = "", env: dict | None = None) -> dict:
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "suite": suite, "command": command,
            "environment": env or environment(), "config": config, "results": results}


def validate(doc) -> list[str]:
    """Problems that make `doc` not a version-1 bench document (empty list: valid)."""
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    problems = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc.get("version") != SCHEMA_VERSION:
        problems.append(f"version is {doc.get('version')!r}, expected {SCHEMA_VERSION}")
    for key, kind in (("suite", str), ("environment", dict), ("config", dict), ("results", list)):
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key!r} missing or not a {kind.__name__}")
    for i, row in enumerate(doc.get("results") or []):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            problems.append(f"results[{i}] has no 'name'")
            continue
        for label, m in (row.get("measurements") or {}).items():
            missing = [k for k in STAT_KEYS if not isinstance(m.get(k), (int, float))]
            if missing:
                problems.append(f"results[{i}] ({row['name']}) measurement {label!r} lacks {missing}")
        if "measurements" in row and not (row.get("speedup") is None or isinstance(row["speedup"], (int, float))):
            problems.append(f"results[{i}] ({row['name']}) speedup is not a number or null")
    return problems


def write_json(doc: dict, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(doc, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; give a JSON file written by `cudacnn bench ... --out DIR`")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); give a file written by `cudacnn bench`")
    problems = validate(doc)
    if problems:
        raise ConfigError(f"{path} is not a cudacnn bench result: {'; '.join(problems[:3])}")
    return doc


# -- formatting
def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1000:.3g} us"


def fmt_measurement(m: dict | None) -> str:
    if not m:
        return "-"
    text = f"{fmt_ms(m['median_ms'])} [{fmt_ms(m['q1_ms'])}-{fmt_ms(m['q3_ms'])}]"
    if m.get("accuracy") is not None:
        text += f", acc {100 * m['accuracy']:.1f}%"
    return text


def fmt_speedup(speedup) -> str:
    return "-" if speedup is None else f"{speedup:.3g}x"


def tables(doc: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The document's rows as (title, header, rows) tables: measured rows grouped by group and labels,
    rows of other shapes by their set of keys."""
    grouped: dict[tuple, list[dict]] = {}
    for row in doc["results"]:
        if "measurements" in row:
            key = ("m", row.get("group", ""), tuple(row["measurements"]))
        else:
            key = ("g", row.get("group", ""), ())
        grouped.setdefault(key, []).append(row)
    out = []
    for (kind, group, labels), rows in grouped.items():
        if kind == "m":
            header = ["name", *[f"{label} median [IQR]" for label in labels], "speedup"]
            body = [[r["name"], *[fmt_measurement(r["measurements"].get(l)) for l in labels], fmt_speedup(r["speedup"])]
                    for r in rows]
            notes = {n for r in rows for m in r["measurements"].values() if (n := m.get("note"))}
            title = group + ("" if not notes else "  (" + "; ".join(sorted(notes)) + ")")
        else:  # one column per key any row has, in first-seen order
            header = list(dict.fromkeys(k for r in rows for k in r if k != "group"))
            body = [[fmt(r[k]) if k in r else "" for k in header] for r in rows]
            title = group
        out.append((title, header, body))
    return out


def environment_lines(env: dict) -> list[str]:
    gpu = f"{env.get('gpu')} (driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})" \
        if env.get("gpu") else "none"
    return [f"date: {env.get('date')}",
            f"GPU: {gpu}",
            f"CPU: {env.get('cpu_model')}, {env.get('cpu_cores')} cores, torch threads {env.get('torch_threads')}, "
            f"load average {env.get('load_avg_1m')} at start",
            f"torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}, numpy {env.get('numpy')}"]


def to_markdown(doc: dict) -> str:
    lines = [f"## cudacnn bench {doc['suite']}", ""]
    if doc.get("command"):
        lines += [f"`{doc['command']}`", ""]
    lines += [f"- {line}" for line in environment_lines(doc["environment"])] + [""]
    for title, header, body in tables(doc):
        if title:
            lines += [f"### {title}", ""]
        lines += [md_table(header, body), ""]
    return "\n".join(lines)


def print_tables(doc: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]cudacnn bench {doc['suite']}[/]")
    for line in environment_lines(doc["environment"]):
        console.print("  " + line)
    for title, header, body in tables(doc):
        table = Table(*header, title=title or None)
        for row in body:
            table.add_row(*row)
        console.print(table)


def speedups(doc: dict) -> list[tuple[str, float]]:
    return [(row["name"], float(row["speedup"])) for row in doc["results"]
            if isinstance(row.get("speedup"), (int, float)) and row["speedup"] > 0]


def plot_speedups(doc: dict, path: Path) -> Path | None:
    """Horizontal bars of speedup on a log axis (None when the document has no speedups to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cudacnn.evaluate.plots import save_figure

    pairs = speedups(doc)
    if not pairs:
        return None
    names, values = zip(*pairs)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(pairs) + 1.6))
    y = range(len(pairs))
    ax.barh(y, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}x", va="center", fontsize=8)
    env = doc["environment"]
    ax.set_xlabel("speedup (baseline median / candidate median), log scale")
    ax.set_title(f"cudacnn bench {doc['suite']} | GPU: {env.get('gpu') or 'none'} | CPU: {env.get('cpu_model')} "
                 f"({env.get('torch_threads')} threads)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_outputs(doc: dict, out_dir: Path | None, console=None) -> dict[str, Path]:
    """Print the tables; with `out_dir`, also write <suite>.json, .md and .png there."""
    print_tables(doc, console)
    if out_dir is None:
        return {}
    stem = Path(out_dir) / doc["suite"]
    written = {"json": write_json(doc, stem.with_suffix(".json"))}
    written["md"] = write_text_atomic(stem.with_suffix(".md"), to_markdown(doc))
    png = plot_speedups(doc, stem.with_suffix(".png"))
    if png:
        written["png"] = png
    return written


# -- comparing two machines
def _numbers(row: dict) -> dict[str, tuple[float, bool]]:
    """label -> (median ms, True) for measured rows; numeric fields (value, False) for other shapes."""
    if "measurements" in row:
        return {label: (m["median_ms"], True) for label, m in row["measurements"].items()}
    return {k: (float(v), k.endswith("_ms")) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare(a: dict, b: dict) -> list[dict]:
    """Rows present in both documents (matched by suite and name), each shared number side by side with
    ratio = A / B (for times: how many times faster B is)."""
    b_rows = {(b["suite"], r["name"]): r for r in b["results"]}
    out = []
    for row in a["results"]:
        other = b_rows.get((a["suite"], row["name"]))
        if other is None:
            continue
        na, nb = _numbers(row), _numbers(other)
        for key, (va, is_ms) in na.items():
            if key in nb:
                vb = nb[key][0]
                out.append({"name": row["name"], "value": key, "a": va, "b": vb, "is_ms": is_ms,
                            "ratio": va / vb if vb else None})
    return out


def compare_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["name", "value", "A", "B", "A / B"]
    body = [[r["name"], r["value"], *(fmt_ms(v) if r["is_ms"] else fmt(v) for v in (r["a"], r["b"])),
             "-" if r["ratio"] is None else f"{r['ratio']:.3g}"] for r in rows]
    return header, body


def compare_markdown(rows: list[dict], a_name: str, b_name: str) -> str:
    lines = [f"A: {a_name}  ", f"B: {b_name}", "", md_table(*compare_table(rows))]
    return "\n".join(lines) + "\n"
