"""Train presets back to back on one GPU and print one table (accuracy, time, peak memory).

    PYTHONPATH=src python3 scripts/run_presets.py --data .data/cifar10-jpeg.tar.gz keras-cnn bn-dropout ...
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from cudacnn.data import load_dataset
from cudacnn.train.config import resolve
from cudacnn.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="/tmp/runs")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. --set epochs=2")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:  # a bare word such as triton
            overrides[key] = value
    dataset = load_dataset(args.data)
    rows = []
    for preset in args.presets:
        gc.collect()  # free the previous trainer's device tensors before measuring this one's peak
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        config = resolve(preset, None, {"out": args.out, "name": f"{preset}-{int(time.time())}", **overrides})
        start = time.perf_counter()
        result = Trainer(config, dataset=dataset, quiet=True).fit()
        evaluation = json.loads((result.run_dir / "eval.json").read_text())
        row = {"preset": preset, "model": config.model, "epochs": result.epochs_done,
               "test_acc": result.test_accuracy,
               "test_acc_without_tta": evaluation.get("accuracy_without_tta"), "train_time_s": evaluation["train_time_s"],
               "wall_s": time.perf_counter() - start, "peak_gpu_mb": evaluation.get("peak_gpu_memory_mb"),
               "tta": config.tta}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del result
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": str(date.today())}
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(env)
    print(f"{'preset':22} {'epochs':>6} {'test acc':>9} {'no TTA':>7} {'train s':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['preset']:22} {r['epochs']:>6} {r['test_acc']:>9.4f} {r['test_acc_without_tta']:>7.4f} "
              f"{r['train_time_s']:>8.1f} "
              f"{(r['peak_gpu_mb'] or 0):>8.0f}")


if __name__ == "__main__":
    main()
