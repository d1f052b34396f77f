"""Do fast96's pooling layers cost more than they should? Times one compiled fast96 training step's forward +
backward (batch 1500, fp16, channels_last) with the model's pools and with alternatives, and lists each
variant's top GPU kernels:
  max_pool2d   the model as it is (F.max_pool2d in each group and, as one 3x3 window, before the head)
  amax         each group's 2x2 pool as a reshape + amax (no indices saved)
  adaptive     the final global pool as adaptive_max_pool2d (its backward uses atomics)
  global_amax  the final global pool as x.amax((2, 3)) (the model does not use it: compiled in fp16 its backward
               can turn NaN, see models/fast.py)

    PYTHONPATH=src python3 scripts/profile_pool.py [VARIANT ...]
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cudacnn.models import fast


MAX_POOL2D, GLOBAL_MAX_POOL = F.max_pool2d, fast.global_max_pool  # before any patching


def amax_pool(x: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """2x2 max pool (floor mode, as F.max_pool2d(x, 2)) as a reshape and a reduction: no indices saved."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    return x[:, :, : 2 * h, : 2 * w].unflatten(3, (w, 2)).unflatten(2, (h, 2)).amax((3, 5))


def global_amax(x: torch.Tensor) -> torch.Tensor:
    return x.amax((2, 3))


def adaptive(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def global_window(x: torch.Tensor) -> torch.Tensor:
    """The model's global pool, on the unpatched max_pool2d (the amax variant replaces F.max_pool2d)."""
    return MAX_POOL2D(x, kernel_size=x.shape[-2:]).flatten(1)


def step_ms(pool, global_pool, batch=1500, iters=30):
    # the model's own forwards, with the pools they call swapped (read from F and the module at trace time)
    F.max_pool2d, fast.global_max_pool = pool, global_pool
    torch._dynamo.reset()
    model = fast.fast96().cuda().to(memory_format=torch.channels_last).to_training_dtype(torch.float16)
    net = torch.compile(model, dynamic=False)
    x = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        F.cross_entropy(net(x), y, reduction="sum").backward()

    for _ in range(3):
        step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    stop.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters, prof


if __name__ == "__main__":
    x = torch.randn(4, 8, 31, 31, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert torch.equal(amax_pool(x), MAX_POOL2D(x, 2)) and torch.equal(global_amax(x), GLOBAL_MAX_POOL(x))
    assert torch.equal(adaptive(x), GLOBAL_MAX_POOL(x))
    torch.backends.cudnn.benchmark = True
    variants = {"max_pool2d": (MAX_POOL2D, GLOBAL_MAX_POOL), "amax": (amax_pool, global_window),
                "adaptive": (MAX_POOL2D, adaptive), "global_amax": (MAX_POOL2D, global_amax)}
    for name in sys.argv[1:] or variants:
        ms, prof = step_ms(*variants[name])
        print(f"== {name}: {ms:.3f} ms per forward + backward (batch 1500)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
