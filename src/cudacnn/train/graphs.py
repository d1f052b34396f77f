"""The training step's forward, loss and backward replayed from one CUDA graph (`cudacnn train --cuda-graphs`).

A small net's eager training step is host-bound on a fast GPU: the Python, dispatcher and autograd work of
each launch takes longer than the kernel (benchmarks/kernels.md). The step's forward, loss, backward and the
epoch's running totals (loss sum, correct predictions) are captured once, at the first step, in one CUDA
graph; each step then copies its batch into the graph's input and replays it. The optimizer, the schedule and
EMA stay eager: the schedule changes the learning rate and, under OneCycle, the momentum every step, and the
fused optimizers take those as host numbers, which a graph would freeze. Unlike `--compile --compile-mode
reduce-overhead`, which also replays graphs, nothing is compiled: the graph holds the eager kernels (PyTorch's,
or ours with --kernels), so `--kernels triton` against `--kernels torch` still compares kernels.

What a graph needs and the Trainer guarantees: one batch shape (a batch of another shape runs eagerly), the
same parameters, buffers and gradients for the whole run (the optimizer and checkpoint loads update them in
place; nothing sets the gradients to None), and no host sync inside the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cudacnn.errors import ConfigError

# The step the graph holds: (images, labels, loss sum, correct count) -> None; it runs forward, loss and
# backward and adds the batch's loss sum and correct predictions to the two totals in place.
StepBody = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

WARMUP_STEPS = 3  # cuDNN's algorithm search, Triton's autotuning and first allocations happen outside the capture


def check_graphs(config, device: torch.device, distributed: bool) -> None:
    """Refuses --cuda-graphs where one graph cannot stand in for the step's forward and backward."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA GPU and this run is on {device.type}; drop --cuda-graphs "
                          "(resuming such a run: --no-cuda-graphs)")
    if distributed:
        raise ConfigError("--cuda-graphs trains on one GPU (its graph stands in for the step on one device, "
                          "not for DDP's gradient all-reduce); drop --cuda-graphs or train without torchrun/--gpus")
    if 0 < config.max_per_gpu_batch < config.batch_size:
        raise ConfigError(f"--cuda-graphs captures one batch shape, and --max-per-gpu-batch "
                          f"{config.max_per_gpu_batch} splits each batch of {config.batch_size} into smaller "
                          "ones; drop one of the two")


class GraphedStep:
    """`step(images, labels)`: the model's forward, loss and backward, from a graph captured at the first call
    (whose batch shape, strides and dtypes it takes; another batch runs `body` eagerly). The gradients land in
    the parameters' `.grad` tensors, overwritten each step, for the optimizer to read; the loss and correct
    predictions add up in `totals()`.

    Capture runs a few warm-up steps on the first batch; their effects (BatchNorm statistics, the random stream
    dropout draws from, the totals) are undone, so a run with the graph starts where one without would."""

    def __init__(self, model: nn.Module, body: StepBody, device: torch.device):
        self.model, self.body = model, body
        self.graph: torch.cuda.CUDAGraph | None = None
        self.layout: tuple | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's running loss sum and correct count, zeroed: the graph adds to these very tensors."""
        self.loss_sum.zero_()
        self.correct.zero_()
        return self.loss_sum, self.correct

    @staticmethod
    def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple:
        return x.shape, x.stride(), x.dtype, y.shape, y.dtype

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is None:
            self._capture(x, y)
        if self._layout(x, y) == self.layout:
            static_x, static_y = self.inputs
            static_x.copy_(x)
            static_y.copy_(y)
            self.graph.replay()
            return
        # Eagerly, into the graph's own gradient tensors: zeroed in place (None would detach them from the graph)
        self.model.zero_grad(set_to_none=False)
        self.body(x, y, self.loss_sum, self.correct)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        totals = (self.loss_sum.clone(), self.correct.clone())
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.cuda.get_rng_state(x.device)
        self.inputs = (x.detach().clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.model.zero_grad(set_to_none=True)
                    self.body(*self.inputs, self.loss_sum, self.correct)
            torch.cuda.current_stream(x.device).wait_stream(side)
            # No gradients at capture: the captured backward then writes them instead of adding to old ones.
            self.model.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.body(*self.inputs, self.loss_sum, self.correct)
        except RuntimeError as error:  # e.g. a module that reads a tensor on the host in its forward
            self.inputs = None
            self.model.zero_grad(set_to_none=True)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"--cuda-graphs could not capture this model's training step ({first}); train "
                              "without --cuda-graphs") from error
        finally:
            with torch.no_grad():  # in place: the graph reads and updates these very tensors
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
                self.loss_sum.copy_(totals[0])
                self.correct.copy_(totals[1])
            torch.cuda.set_rng_state(rng, x.device)
        self.graph, self.layout = graph, self._layout(x, y)
