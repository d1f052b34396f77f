"""A/B of the presets' training epochs under two environments, runs alternating: e.g. the fused BatchNorm's
C++ launch path (A, the default) against its Python launcher (B, CUDACNN_PLANNED_LAUNCH=0), eager or under
one torch.compile mode (--compile-mode).

Each run is a fresh process of `cudacnn bench cnn-kernels --no-ops` (so that settings read at import take
effect), A then B, for --rounds rounds; alternating spreads a machine's drift over both sides. The
table gives, per preset and side, each run's PyTorch / our epoch seconds, the time ratio ours / PyTorch, and
the median ratio. Eager epochs of small nets are host-bound and move between runs on a shared machine: compare
the two sides' medians, and PyTorch's own spread, not single runs.

    PYTHONPATH=src python3 dev/epoch_ab.py --data .data/cifar10-jpeg.tar.gz --b CUDACNN_PLANNED_LAUNCH=0 \\
        --rounds 5 --out $OUT/ab
    python3 dev/epoch_ab.py --summarize $OUT/ab      # the table again from a finished (or cut short) run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("a", "b")
TORCH, OURS = "--kernels torch", "--kernels triton"


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: {item!r} is not NAME=VALUE; pass e.g. --b CUDACNN_PLANNED_LAUNCH=0")
        env[name] = value
    return env


def run_one(folder: Path, env: dict[str, str], args) -> int:
    """One bench process writing folder/cnn-kernels.json; its output goes to folder/log.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = ["--no-eager", "--compile-modes", args.compile_mode] if args.compile_mode else ["--no-compile"]
    command = [sys.executable, "-m", "cudacnn", "bench", "cnn-kernels", "--no-ops", *mode,
               "--timed-epochs", str(args.timed_epochs), "--presets", args.presets, "--out", str(folder)]
    if args.data:
        command += ["--data", args.data]
    with open(folder / "log.txt", "w") as log:
        return subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT).returncode


def epochs_of(folder: Path) -> dict[str, dict]:
    """{preset (mode): {torch_s, ours_s, ratio, torch_loss, ours_loss}} from one run's JSON (what it finished)."""
    path = folder / "cnn-kernels.json"
    if not path.exists():
        return {}
    out = {}
    for row in json.loads(path.read_text())["results"]:
        if not row["name"].endswith(": torch vs triton kernels"):
            continue
        m, info = row["measurements"], row["info"]
        torch_s, ours_s = m[TORCH]["median_ms"] / 1e3, m[OURS]["median_ms"] / 1e3
        preset, mode = row["name"].removesuffix(": torch vs triton kernels").split(" epoch, ")
        out[f"{preset} ({mode})"] = dict(torch_s=torch_s, ours_s=ours_s, ratio=ours_s / torch_s,
                                         torch_loss=info.get("torch_train_loss"),
                                         ours_loss=info.get("triton_train_loss"))
    return out


def summarize(root: Path) -> tuple[str, dict]:
    """The markdown table and the data behind it, from root/<side>-<round>/ folders."""
    runs = {side: [epochs_of(f) for f in sorted(root.glob(f"{side}-*"), key=lambda f: int(f.name.split("-")[1]))]
            for side in SIDES}
    presets = sorted({p for side in runs.values() for run in side for p in run})
    settings = json.loads((root / "settings.json").read_text()) if (root / "settings.json").exists() else {}
    lines = ["| preset | side | PyTorch / ours s, each run | ours / PyTorch, each run | median |",
             "|---|---|---|---|---:|"]
    data = {"settings": settings, "presets": {}}
    for preset in presets:
        data["presets"][preset] = {}
        for side in SIDES:
            got = [run[preset] for run in runs[side] if preset in run]
            if not got:
                continue
            ratios = [g["ratio"] for g in got]
            median = statistics.median(ratios)
            data["presets"][preset][side] = dict(runs=got, median_ratio=median)
            label = f"{side.upper()} ({' '.join(f'{k}={v}' for k, v in settings.get(side, {}).items()) or 'as is'})"
            lines.append(f"| {preset} | {label} | " + ", ".join(f"{g['torch_s']:.3f} / {g['ours_s']:.3f}" for g in got)
                         + " | " + ", ".join(f"{r:.2f}" for r in ratios) + f" | {median:.2f}x |")
    return "\n".join(lines), data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", action="append", default=[], metavar="NAME=VALUE", help="side A's environment")
    p.add_argument("--b", action="append", default=[], metavar="NAME=VALUE", help="side B's environment")
    p.add_argument("--rounds", type=int, default=5, help="runs a side (default 5)")
    p.add_argument("--presets", default="smallnet-plus,resnet18-cifar,bn-dropout-plus")
    p.add_argument("--timed-epochs", type=int, default=3, help="timed epochs a run (default 3)")
    p.add_argument("--compile-mode", help="time compiled epochs in this torch.compile mode (default: eager)")
    p.add_argument("--data", help="data source, as for cudacnn bench")
    p.add_argument("--out", type=Path, help="folder for each run's JSON and log, the table and its data")
    p.add_argument("--budget-s", type=float, default=480, help="start no new run after this many seconds")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="only print the table of an earlier --out")
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize)[0])
        return
    if not args.out:
        raise SystemExit("error: --out DIR is needed (each run writes its JSON there)")
    sides = {"a": parse_env(args.a), "b": parse_env(args.b)}
    if sides["a"] == sides["b"]:
        raise SystemExit("error: sides A and B have the same environment; give --b (or --a) a setting to compare")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "settings.json").write_text(json.dumps(sides, indent=2))
    start = time.monotonic()
    for round_, side in ((r, side) for r in range(1, args.rounds + 1) for side in SIDES):
        if time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopped before {side}-{round_}", flush=True)
            break
        t0 = time.monotonic()
        code = run_one(args.out / f"{side}-{round_}", sides[side], args)
        print(f"{side}-{round_}: exit {code}, {time.monotonic() - t0:.0f} s", flush=True)
    table, data = summarize(args.out)
    (args.out / "ab.md").write_text(table + "\n")
    (args.out / "ab.json").write_text(json.dumps(data, indent=2))
    print(table)


if __name__ == "__main__":
    main()
