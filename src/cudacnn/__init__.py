"""cudacnn: GPU-accelerated CNN training for CIFAR-10."""

__version__ = "0.1.0"
