"""Cost of running backward on autograd's CUDA device thread against the calling thread, for the fused BatchNorm +
ReLU op (cudacnn::batchnorm_act, our autograd Function) and for PyTorch's F.batch_norm + F.relu: host time of a
forward + torch.autograd.grad call, bf16 channels_last, training, with torch.autograd's multithreading on
(PyTorch's default: the graph is handed to the device thread and the caller waits) and off (what the Trainer does
on one GPU). Best of 5 rounds of 300 calls, launched without synchronizing, after 20 warm-up calls; "synced"
synchronizes after each call.

    PYTHONPATH=src python3 dev/backward_thread.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _harness import per_call_us

from cudacnn.kernels import ops

SHAPES = [(256, 256, 4, 4), (256, 64, 32, 32)]  # a small late stage, host-bound; smallnet's first stage
CALLS, ROUNDS, WARMUP = 300, 5, 20


def calls(shape):
    def channels_last(*size):
        return torch.randn(size, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    c = shape[1]
    x, dy = channels_last(*shape).requires_grad_(), channels_last(*shape)
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    return {
        "ours (fused BN+ReLU)": lambda: torch.autograd.grad(
            ops.batchnorm_act(x, w, b, None, rm, rv, True, 0.1, 1e-5, "relu"), (x, w, b), dy),
        "PyTorch BN + ReLU": lambda: torch.autograd.grad(
            F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)), (x, w, b), dy),
    }


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU; run it on the GPU machine")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; forward + autograd.grad, us a call")
    for shape in SHAPES:
        for name, fn in calls(shape).items():
            row = []
            for threads, label in ((True, "device thread"), (False, "calling thread")):
                with torch.autograd.set_multithreading_enabled(threads):
                    issued = per_call_us(fn, CALLS, ROUNDS, warmup=WARMUP)
                    synced = per_call_us(fn, CALLS, ROUNDS, sync="each", warmup=WARMUP)
                    row.append(f"{label} {issued:7.1f} (synced {synced:7.1f})")
            print(f"{'x'.join(map(str, shape)):14s} {name:22s} " + "   ".join(row), flush=True)


if __name__ == "__main__":
    main()
