"""The model's training forward and backward replayed from CUDA graphs (`cudacnn train --cuda-graphs`).

A small net's eager training step is host-bound on a fast GPU: the Python, dispatcher and autograd work of
each launch takes longer than the kernel (benchmarks/kernels.md). PyTorch's `make_graphed_callables` captures
the forward and the backward once each; a step then replays them, and only the loss, the optimizer, the
schedule and the running metrics stay eager. Unlike `--compile --compile-mode reduce-overhead`, which also
replays graphs, nothing is compiled: the graphs hold the eager kernels (PyTorch's, or ours with --kernels), so
capture takes a few steps' time and `--kernels triton` against `--kernels torch` still compares kernels.

What a graph needs and the Trainer guarantees: one batch shape (its training batches all have the size of the
batch; a batch of another shape runs eagerly), the same parameters and buffers for the whole run (the
optimizer and checkpoint loads update them in place), and no host sync inside the model.
"""

from __future__ import annotations

import torch
from torch import nn

from cudacnn.errors import ConfigError


def check_graphs(config, device: torch.device, distributed: bool) -> None:
    """Refuses --cuda-graphs where the graphs cannot stand in for the model's forward and backward."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA GPU and this run is on {device.type}; drop --cuda-graphs "
                          "(resuming such a run: --no-cuda-graphs)")
    if distributed:
        raise ConfigError("--cuda-graphs trains on one GPU (its graphs stand in for the model, not for DDP's "
                          "wrapper of it); drop --cuda-graphs or train without torchrun/--gpus")
    if 0 < config.max_per_gpu_batch < config.batch_size:
        raise ConfigError(f"--cuda-graphs captures one batch shape, and --max-per-gpu-batch "
                          f"{config.max_per_gpu_batch} splits each batch of {config.batch_size} into smaller "
                          "ones; drop one of the two")


class _Train(nn.Module):
    """The model behind a module of its own: make_graphed_callables replaces its argument's forward, and the
    model's own forward must stay eager for evaluation, prediction and export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GraphedForward:
    """Calls the model; in training mode, with gradients on, from graphs captured at the first call (whose
    batch shape, strides and dtype the graphs take; another batch runs the model eagerly).

    Capture runs three warm-up steps on the first batch; their effects (BatchNorm statistics, the random
    stream dropout draws from) are undone, so a run with graphs starts where one without would."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.graphed: nn.Module | None = None
        self.layout: tuple | None = None

    @staticmethod
    def _layout(x: torch.Tensor) -> tuple:
        return x.shape, x.stride(), x.dtype, x.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.model.training and torch.is_grad_enabled()) or x.requires_grad:
            return self.model(x)
        if self.graphed is None:
            self._capture(x)
        if self._layout(x) != self.layout:
            return self.model(x)
        return self.graphed(x)

    def _capture(self, x: torch.Tensor) -> None:
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.cuda.get_rng_state(x.device)
        # The graphs keep the autocast casts of the step that captured them; autocast's weight-cast cache
        # cannot be on during capture (its cached casts would outlive the graph's memory pool).
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        try:
            with autocast:
                self.graphed = torch.cuda.make_graphed_callables(_Train(self.model), (x.detach().clone(),),
                                                                 allow_unused_input=True)
        except RuntimeError as error:  # e.g. a module that reads a tensor on the host in its forward
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"--cuda-graphs could not capture this model's training step ({first}); train "
                              "without --cuda-graphs") from error
        finally:
            with torch.no_grad():  # in place: the graphs read and update these very tensors
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
            torch.cuda.set_rng_state(rng, x.device)
        self.layout = self._layout(x)
