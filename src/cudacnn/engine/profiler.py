"""model.profile(X, y): per-layer forward/backward time and memory, printed as a table.

Times are device events around each layer on the GPU (so they measure kernel time, not launch
overhead alone) and wall-clock on the CPU; the median of `repeats` training steps after one warm-up.
Memory is what a layer keeps alive after its forward pass (its output plus what backward needs):
the pool's bytes-in-use delta on the GPU, tracemalloc's on the CPU (NumPy reports to it).
"""

from __future__ import annotations

import statistics
import tracemalloc

import numpy as np

from cudacnn.timing import DeviceTimer


def _timer_device(ops) -> str:
    import torch

    return "cuda" if ops.name == "cuda" and torch.cuda.is_available() else "cpu"


class _Memory:
    def __init__(self, ops):
        self.gpu = ops.name == "cuda"
        if self.gpu:
            from cudacnn.engine.memory import default_pool

            self.pool = default_pool()
        else:
            self.started = not tracemalloc.is_tracing()
            if self.started:
                tracemalloc.start()

    def close(self) -> None:
        if not self.gpu and self.started:  # tracemalloc slows every NumPy allocation: stop it again
            tracemalloc.stop()

    def in_use(self) -> int:
        return self.pool.in_use if self.gpu else tracemalloc.get_traced_memory()[0]


def profile_model(model, X, y, repeats: int = 5, print_table: bool = True) -> list[dict]:
    from cudacnn.engine.optim import SGD

    ops = model.ops
    x_dev = ops.asarray(X)
    y_dev = ops.asarray(np.asarray(y).astype(np.int64))
    layers = model._logit_layers()
    timer, memory = DeviceTimer(_timer_device(ops)), _Memory(ops)
    optimizer = SGD(model.parameters(), lr=0.0)  # a real update step, without changing the weights
    fwd = [[] for _ in layers]
    bwd = [[] for _ in layers]
    kept = [0] * len(layers)
    shapes = [None] * len(layers)
    # training forwards move BatchNorm's running statistics: the model gets them, and its mode, back afterwards
    saved, was_training = model.state_dict(), model.training
    model.train()
    try:
        for repeat in range(repeats + 1):
            marks_f, marks_b = [], []
            h = x_dev
            for i, layer in enumerate(layers):
                before = memory.in_use()
                start = timer.mark()
                h = layer.forward(h)
                marks_f.append((start, timer.mark()))
                kept[i] = memory.in_use() - before
                shapes[i] = tuple(h.shape)
            stats = ops.zeros((2,))
            grad = ops.softmax_xent(h, y_dev, stats)
            for i in reversed(range(len(layers))):
                start = timer.mark()
                grad = layers[i].backward(grad, need_input_grad=i > 0)
                marks_b.append((i, start, timer.mark()))
            optimizer.step()
            ops.synchronize()
            if repeat == 0:
                continue  # warm-up: kernel compilation, first slabs
            for i, (start, end) in enumerate(marks_f):
                fwd[i].append(timer.elapsed_ms(start, end))
            for i, start, end in marks_b:
                bwd[i].append(timer.elapsed_ms(start, end))
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        memory.close()
    rows = []
    for i, layer in enumerate(layers):
        params = sum(int(np.prod(p.shape)) for p in layer.parameters().values())
        rows.append({"layer": f"{i} {layer!r}", "output": shapes[i], "params": params,
                     "forward_ms": statistics.median(fwd[i]), "backward_ms": statistics.median(bwd[i]),
                     "kept_mib": kept[i] / 2**20})
    if print_table:
        _print(rows, model.device, len(X))
    return rows


def _print(rows, device, batch) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine profile: device={device}, batch={batch} (median ms)")
    for name in ("layer", "output", "params", "forward ms", "backward ms", "kept MiB"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for r in rows:
        table.add_row(r["layer"], str(r["output"]), f"{r['params']:,}", f"{r['forward_ms']:.3f}",
                      f"{r['backward_ms']:.3f}", f"{r['kept_mib']:.2f}")
    table.add_row("total", "", f"{sum(r['params'] for r in rows):,}", f"{sum(r['forward_ms'] for r in rows):.3f}",
                  f"{sum(r['backward_ms'] for r in rows):.3f}", f"{sum(r['kept_mib'] for r in rows):.2f}",
                  style="bold")
    Console().print(table)
