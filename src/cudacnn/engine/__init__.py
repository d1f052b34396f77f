"""cudacnn.engine: a small neural-network framework of our own, NumPy in and NumPy out.

    import cudacnn.engine as gnn
    model = gnn.Sequential([gnn.Linear(784, 256), gnn.ReLU(), gnn.Linear(256, 10), gnn.Softmax()])
    model.to("cuda")          # our Triton kernels + our memory pool; "cpu" runs the same layers on NumPy
    history = model.fit(X, y, epochs=5, optimizer=gnn.Adam(model.parameters()))

No torch.nn, torch.autograd or torch.optim: on the GPU, torch tensors are only windows into the pool's
slabs, and every operation is a Triton kernel (cudacnn.kernels for GEMM and activations, gpu_kernels.py
for the rest).
"""

from cudacnn.engine.layers import (GELU, BatchNorm2d, Conv2d, Dropout, Flatten, Layer, Linear, MaxPool2d, Parameter,
                                   ReLU, Softmax, manual_seed)
from cudacnn.engine.memory import MemoryPool, PoolExhaustedError, configure_memory, memory_stats
from cudacnn.engine.model import Sequential, backend, cross_entropy_loss
from cudacnn.engine.optim import SGD, Adam, Optimizer


def simple_cnn(num_classes: int = 10) -> Sequential:
    """The Keras-tutorial CIFAR-10 CNN (the zoo's `simple`): three 3x3 valid convolutions (32, 64, 64) with
    2x2 max-pooling after the first two, then Dense(64) and Dense(num_classes)."""
    return Sequential([
        Conv2d(3, 32, 3), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3), ReLU(), MaxPool2d(2),
        Conv2d(64, 64, 3), ReLU(),
        Flatten(), Linear(64 * 4 * 4, 64), ReLU(), Linear(64, num_classes),
    ])


__all__ = ["Sequential", "Layer", "Parameter", "Linear", "Conv2d", "MaxPool2d", "Flatten", "Dropout", "BatchNorm2d",
           "ReLU", "GELU", "Softmax", "SGD", "Adam", "Optimizer", "cross_entropy_loss", "memory_stats",
           "configure_memory", "MemoryPool", "PoolExhaustedError", "manual_seed", "backend", "simple_cnn"]
