"""Data layer: any source (CIFAR archives, image folders of any image size) -> uint8 arrays of one size (cached)
-> GPU-resident augmented batches."""

from cudacnn.data.dataset import Dataset, Split, channel_stats
from cudacnn.data.loader import CIFAR10_MEAN, CIFAR10_STD, Augment, GpuLoader
from cudacnn.data.sources import load_dataset, read_source, resolve_source
from cudacnn.data.split import split_validation, stratified_split

__all__ = ["Dataset", "Split", "channel_stats", "Augment", "GpuLoader", "CIFAR10_MEAN", "CIFAR10_STD",
           "load_dataset", "read_source", "resolve_source", "split_validation", "stratified_split"]
