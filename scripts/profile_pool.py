"""Do fast96's pooling layers cost more than they should? Times one compiled fast96 training step's forward +
backward (batch 1500, fp16, channels_last) with the model's pools and with alternatives, and lists each
variant's top GPU kernels:
  max_pool2d   the model as it is (F.max_pool2d in each group, F.adaptive_max_pool2d before the head)
  amax         each group's 2x2 pool as a reshape + amax (no indices saved)
  global_amax  the final global pool as x.amax((2, 3)) (its backward fuses; adaptive_max_pool2d's is atomic)

    PYTHONPATH=src python3 scripts/profile_pool.py [VARIANT ...]
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cudacnn.models import fast


def amax_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pool (floor mode, as F.max_pool2d(x, 2)) as a reshape and a reduction: no indices saved."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    return x[:, :, : 2 * h, : 2 * w].unflatten(3, (w, 2)).unflatten(2, (h, 2)).amax((3, 5))


def group_forward(self, x, pool):
    x = F.gelu(self.norms[0](pool(self.convs[0](x))))
    first = x
    for conv, norm in zip(self.convs[1:], self.norms[1:]):
        x = F.gelu(norm(conv(x)))
    return x + first if self.depth >= 3 else x


def net_forward(self, x, global_pool):
    x = self.groups(F.gelu(self.whiten(x)))
    return self.head(global_pool(x)) * self.logit_scale


def step_ms(pool, global_pool, batch=1500, iters=30):
    fast.ConvGroup.forward = lambda self, x: group_forward(self, x, pool)
    fast.FastNet.forward = lambda self, x: net_forward(self, x, global_pool)
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
    assert torch.equal(amax_pool(x), F.max_pool2d(x, 2))
    torch.backends.cudnn.benchmark = True
    max_pool, adaptive = (lambda t: F.max_pool2d(t, 2)), (lambda t: F.adaptive_max_pool2d(t, 1).flatten(1))
    variants = {"max_pool2d": (max_pool, adaptive), "amax": (amax_pool, adaptive),
                "global_amax": (max_pool, lambda t: t.amax((2, 3)))}
    for name in sys.argv[1:] or variants:
        ms, prof = step_ms(*variants[name])
        print(f"== {name}: {ms:.3f} ms per forward + backward (batch 1500)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
