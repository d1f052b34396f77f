"""Where a fast recipe's GPU time goes: torch.profiler over a short run after the warm-up, the ops sorted
by GPU time; the `proxy_filter` range is the hard-example filter's share (keep_fraction < 1).

    PYTHONPATH=src python3 scripts/profile_fast_step.py fast96 keep_fraction=0.75 proxy_learn_every=2
"""

import sys

from torch.profiler import ProfilerActivity, profile

from cudacnn.data import load_dataset
from cudacnn.train.fast.bench import DEFAULT_DATA, parse_overrides
from cudacnn.train.fast.recipe import train_fast, warmup

STEPS = 40


def main() -> None:
    preset, overrides = sys.argv[1], parse_overrides(sys.argv[2:])
    data = load_dataset(DEFAULT_DATA, quiet=True)
    warmup(preset, data, "cuda", **overrides)
    quiet = dict(device="cuda", log=lambda *_: None, max_steps=STEPS, tta_level=0)
    train_fast(preset, data, **quiet, **overrides)  # any first-run graph recording happens outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = train_fast(preset, data, **quiet, **overrides)
    print(f"{preset} {overrides}: {STEPS} steps in {result.train_time_s - result.eval_time_s:.3f} s of device time "
          f"({1000 * (result.train_time_s - result.eval_time_s) / STEPS:.2f} ms a step)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
