"""Do fast96's pooling layers cost more than they should? Times one compiled fast96 training step's forward +
backward (batch 1500, fp16, channels_last) with the model's pools and with alternatives, and lists each
variant's top GPU kernels:
  max_pool2d   the model as it is (F.max_pool2d in each group, F.adaptive_max_pool2d before the head)
  amax         each group's 2x2 pool as a reshape + amax (no indices saved)
  global_amax  the final global pool as x.amax((2, 3)) (its backward fuses; adaptive_max_pool2d's is atomic; the
               model does not use it: compiled in fp16 its backward can turn NaN, see models/fast.py)

    PYTHONPATH=src python3 scripts/profile_pool.py [VARIANT ...]
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cudacnn.models import fast


MAX_POOL2D, ADAPTIVE_MAX_POOL2D = F.max_pool2d, F.adaptive_max_pool2d  # before any patching


def amax_pool(x: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """2x2 max pool (floor mode, as F.max_pool2d(x, 2)) as a reshape and a reduction: no indices saved."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    return x[:, :, : 2 * h, : 2 * w].unflatten(3, (w, 2)).unflatten(2, (h, 2)).amax((3, 5))


def global_amax(x: torch.Tensor, output_size: int = 1) -> torch.Tensor:
    return x.amax((2, 3), keepdim=True)


def step_ms(pool, global_pool, batch=1500, iters=30):
    # the model's own forwards, with the pools they call swapped (the model reads them from F at trace time)
    F.max_pool2d, F.adaptive_max_pool2d = pool, global_pool
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
    assert torch.equal(amax_pool(x), MAX_POOL2D(x, 2)) and torch.equal(global_amax(x), ADAPTIVE_MAX_POOL2D(x, 1))
    torch.backends.cudnn.benchmark = True
    variants = {"max_pool2d": (MAX_POOL2D, ADAPTIVE_MAX_POOL2D), "amax": (amax_pool, ADAPTIVE_MAX_POOL2D),
                "global_amax": (MAX_POOL2D, global_amax)}
    for name in sys.argv[1:] or variants:
        ms, prof = step_ms(*variants[name])
        print(f"== {name}: {ms:.3f} ms per forward + backward (batch 1500)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
