"""Sequential: the model container, its training loop (fit), evaluation, profiler and weight files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cudacnn.engine import cpu_ops
from cudacnn.engine.layers import Layer, Softmax
from cudacnn.engine.optim import Adam
from cudacnn.errors import CheckpointError, ConfigError


def backend(device: str):
    """The ops module for a device name: 'cpu' (NumPy) or 'cuda'/'gpu' (Triton kernels, pool memory)."""
    device = str(device)
    if device == "cpu":
        return cpu_ops
    if device.split(":")[0] in ("cuda", "gpu"):
        from cudacnn.engine import gpu_ops
        from cudacnn.engine.memory import gpu_device

        gpu_device()  # a clear error now rather than on the first kernel
        return gpu_ops
    raise ConfigError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def cross_entropy_loss(predictions, targets, from_logits: bool = False) -> float:
    """Mean cross-entropy of class probabilities (a Softmax output) or, with from_logits, of logits."""
    p = np.asarray(predictions if isinstance(predictions, np.ndarray) else predictions.detach().cpu().numpy(),
                   np.float64)
    targets = np.asarray(targets).astype(np.int64)
    if p.ndim != 2 or len(p) != len(targets):
        raise ValueError(f"predictions must be (N, classes) for N targets; got {p.shape} and {targets.shape}")
    if from_logits:
        p = p - p.max(axis=1, keepdims=True)
        log_p = p - np.log(np.exp(p).sum(axis=1, keepdims=True))
    else:
        log_p = np.log(np.clip(p, 1e-12, None))
    return float(-log_p[np.arange(len(targets)), targets].mean())


class Sequential(Layer):
    def __init__(self, layers: list[Layer]):
        self.layers = list(layers)
        self.ops = cpu_ops

    # -- plumbing ---------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.ops.name

    def to(self, device) -> "Sequential":
        ops = backend(device) if isinstance(device, str) else device
        for layer in self.layers:
            layer.to(ops)
        self.ops = ops
        return self

    def train(self, mode: bool = True) -> "Sequential":
        for layer in self.layers:
            layer.training = mode
        self.training = mode
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    def parameters(self) -> dict:
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers) for name, p in layer.parameters().items()}

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters().values())

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(device={self.device}\n{inner}\n)"

    # -- forward and backward ---------------------------------------------------------------------------
    def forward(self, x):
        """NumPy in, NumPy out; backend arrays in, backend arrays out."""
        numpy_in = isinstance(x, np.ndarray) and self.ops is not cpu_ops
        h = self.ops.asarray(x) if numpy_in or isinstance(x, (list, tuple)) else x
        for layer in self.layers:
            h = layer.forward(h)
        return self.ops.to_numpy(h) if numpy_in else h

    def backward(self, dy):
        numpy_in = isinstance(dy, np.ndarray) and self.ops is not cpu_ops
        g = self.ops.asarray(dy) if numpy_in else dy
        for i in reversed(range(len(self.layers))):
            g = self.layers[i].backward(g, need_input_grad=True)
        return self.ops.to_numpy(g) if numpy_in else g

    def _logit_layers(self) -> list[Layer]:
        """The layers up to the logits: a final Softmax is fused into the loss when training."""
        return self.layers[:-1] if self.layers and isinstance(self.layers[-1], Softmax) else self.layers

    def train_step(self, x, y, optimizer, stats=None):
        """One step of softmax cross-entropy training on backend arrays x, y (int class indices).
        stats (backend array (2,)) accumulates [mean loss, correct]; returns it."""
        stats = self.ops.zeros((2,)) if stats is None else stats
        layers = self._logit_layers()
        h = x
        for layer in layers:
            h = layer.forward(h)
        grad = self.ops.softmax_xent(h, y, stats)
        for i in reversed(range(len(layers))):
            grad = layers[i].backward(grad, need_input_grad=i > 0)
        optimizer.step()
        return stats

    # -- whole data sets --------------------------------------------------------------------------------
    def predict(self, X: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Outputs of the whole model for X (NumPy), in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        outs = [self.ops.to_numpy(self.forward(self.ops.asarray(X[i:i + batch_size])))
                for i in range(0, len(X), batch_size)]
        self.train(was_training)
        return np.concatenate(outs)

    def evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on X, y."""
        was_training = self.training
        self.eval()
        layers = self._logit_layers()
        logits = []
        for i in range(0, len(X), batch_size):
            h = self.ops.asarray(X[i:i + batch_size])
            for layer in layers:
                h = layer.forward(h)
            logits.append(self.ops.to_numpy(h))
        self.train(was_training)
        logits = np.concatenate(logits)
        return cross_entropy_loss(logits, y, from_logits=True), float((logits.argmax(1) == y).mean())

    def fit(self, X: np.ndarray, y: np.ndarray, epochs: int = 1, batch_size: int = 64, optimizer=None,
            validation_data=None, shuffle: bool = True, flip: bool = False, seed: int = 0, verbose: bool = True,
            max_steps: int | None = None) -> list[dict]:
        """Train with softmax cross-entropy. The data set is uploaded once; batches are gathered on the
        device (flip=True mirrors images at random on the way). Returns per-epoch metrics."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        ops = self.ops
        optimizer = optimizer or Adam(self.parameters())
        X_dev = ops.asarray(X)
        rng = np.random.default_rng(seed)
        steps_per_epoch = -(-len(X) // batch_size)
        if max_steps is not None:
            steps_per_epoch = min(steps_per_epoch, max_steps)
        history = []
        self.train()
        progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not verbose,
                            transient=True)
        with progress:
            for epoch in range(1, epochs + 1):
                task = progress.add_task("train", total=steps_per_epoch, epoch=epoch, status="")
                order = rng.permutation(len(X)) if shuffle else np.arange(len(X))
                index_dev, y_dev = ops.asarray(order.astype(np.int64)), ops.asarray(y[order].astype(np.int64))
                stats = ops.zeros((2,))
                seen = 0
                ops.synchronize()
                start = time.perf_counter()
                for step in range(steps_per_epoch):
                    lo, hi = step * batch_size, min((step + 1) * batch_size, len(X))
                    xb = ops.gather_rows(X_dev, index_dev[lo:hi], int(rng.integers(2**31)) if flip else None)
                    self.train_step(xb, y_dev[lo:hi], optimizer, stats)
                    seen += hi - lo
                    progress.update(task, advance=1)
                totals = ops.to_numpy(stats)  # the epoch's only device-to-host sync
                seconds = time.perf_counter() - start
                record = {"epoch": epoch, "loss": float(totals[0]) / steps_per_epoch,
                          "accuracy": float(totals[1]) / seen, "seconds": seconds, "images_per_s": seen / seconds}
                if validation_data is not None:
                    record["val_loss"], record["val_accuracy"] = self.evaluate(*validation_data)
                history.append(record)
                progress.remove_task(task)
                if verbose:
                    progress.console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in record.items()))
        return history

    # -- weights ------------------------------------------------------------------------------------------
    def _weights(self) -> dict:
        """Every parameter and buffer on its backend, by state-dict name."""
        weights = {name: p.data for name, p in self.parameters().items()}
        for i, layer in enumerate(self.layers):
            for name in layer.buffers:
                weights[f"{i}.{name}"] = getattr(layer, name)
        return weights

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: self.ops.to_numpy(value).copy() for name, value in self._weights().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = self._weights()  # names and shapes only: nothing leaves the device
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"weights do not match this model: missing {missing}, unexpected {unexpected}; "
                                  "load a file saved from the same architecture")
        for name, value in state.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"weight {name} has shape {tuple(value.shape)} in the file but "
                                      f"{tuple(expected[name].shape)} in the model; same architecture?")
        for name, value in state.items():  # in place: the optimizer and the kernels hold these very arrays
            self.ops.copy_into(expected[name], np.asarray(value, np.float32))

    def save(self, path) -> None:
        np.savez(path, **self.state_dict())

    def load(self, path) -> "Sequential":
        path = Path(path)
        if not path.exists() and path.with_suffix(".npz").exists():
            path = path.with_suffix(".npz")
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; save weights first with model.save(path)")
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k: f[k] for k in f.files}
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a weights file written by model.save ({exc})") from exc
        self.load_state_dict(state)
        return self

    # -- profiler -------------------------------------------------------------------------------------------
    def profile(self, X, y, repeats: int = 5, print_table: bool = True) -> list[dict]:
        """Per-layer forward and backward time (device events on the GPU, median of repeats) and the
        memory each layer keeps for its backward pass, for one training batch X, y."""
        from cudacnn.engine.profiler import profile_model

        return profile_model(self, X, y, repeats=repeats, print_table=print_table)
