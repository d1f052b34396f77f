"""Optimizers: the update rules of torch.optim.SGD and Adam, one fused kernel launch per parameter."""

from __future__ import annotations


class Optimizer:
    def __init__(self, params, lr: float):
        self.params = list(params.values() if isinstance(params, dict) else params)
        if not self.params:
            raise ValueError("the optimizer got no parameters")
        self.lr = lr
        self.state: dict[int, dict] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _state(self, p, names) -> dict:
        """Per-parameter buffers (zeros, on the parameter's backend); rebuilt if the model moved."""
        state = self.state.get(id(p))
        if state is None or state["ops"] is not p.ops:
            state = {"ops": p.ops, **{name: p.ops.zeros(p.shape) for name in names}}
            self.state[id(p)] = state
        return state

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                self._update(p)

    def _update(self, p) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def _update(self, p) -> None:
        buf = self._state(p, ["momentum"])["momentum"] if self.momentum else None
        p.ops.sgd_step(p.data, p.grad, buf, self.lr, self.momentum, self.weight_decay)


class Adam(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _update(self, p) -> None:
        state = self._state(p, ["m", "v"])
        state["step"] = state.get("step", 0) + 1  # per parameter, as torch: bias correction counts its own updates
        p.ops.adam_step(p.data, p.grad, state["m"], state["v"], self.lr, *self.betas, self.eps, self.weight_decay,
                        state["step"])
