"""Where a record recipe's GPU time goes: a short run to warm up and time the steps plainly, then the same run
under torch.profiler, its ops sorted by GPU time. The profiled run also covers the whitening init and a plain
(no-TTA) evaluation. Recipe settings as `cudacnn train --set` takes them:

    PYTHONPATH=src python3 scripts/profile_fast_step.py .data/cifar10-jpeg.tar.gz fast96 keep_fraction=0.5
"""

import sys

from torch.profiler import ProfilerActivity, profile

from cudacnn.data import load_dataset
from cudacnn.errors import CudacnnError
from cudacnn.train.fast.config import parse_settings
from cudacnn.train.fast.recipe import train_fast  # its compile warm-up runs before its timed region


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, preset = argv[:2]
    try:
        overrides = {"max_steps": 40, "tta_level": 0, **parse_settings(argv[2:])}
        data = load_dataset(source, quiet=True)
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
