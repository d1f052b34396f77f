"""Where a fast recipe's GPU time goes: a short run to warm up and time the steps plainly, then the same run
under torch.profiler, its ops sorted by GPU time; the `proxy_filter` range is the hard-example filter's share
(keep_fraction < 1). The profiled run also covers the whitening init and a plain (no-TTA) evaluation.

    PYTHONPATH=src python3 scripts/profile_fast_step.py fast96 keep_fraction=0.75 proxy_learn_every=2
"""

import sys

from torch.profiler import ProfilerActivity, profile

from cudacnn.data import load_dataset
from cudacnn.errors import CudacnnError
from cudacnn.train.fast.bench import DEFAULT_DATA, parse_overrides
from cudacnn.train.fast.recipe import train_fast  # its compile warm-up runs before its timed region


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    preset, overrides = argv[0], {"max_steps": 40, "tta_level": 0, **parse_overrides(argv[1:])}
    try:
        data = load_dataset(DEFAULT_DATA, quiet=True)
        plain = train_fast(preset, data, device="cuda", log=lambda *_: None, **overrides)  # the unprofiled time
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_fast(preset, data, device="cuda", log=lambda *_: None, **overrides)
    except CudacnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    steps = plain.history[-1]["step"]
    train_s = plain.train_time_s - plain.eval_time_s
    print(f"{preset} {overrides}: {steps} steps in {train_s:.3f} s of device time, unprofiled "
          f"({1000 * train_s / steps:.2f} ms a step)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
