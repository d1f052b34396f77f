"""Resolve a source (a name like 'cifar10' or 'sample', or a path) into a Dataset, through the decoded cache."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from cudacnn.data import cache
from cudacnn.data.cifar import OFFICIAL, detect_official, read_binary, read_python
from cudacnn.data.dataset import Dataset
from cudacnn.data.dataset import Split
from cudacnn.download import DownloadError, download
from cudacnn.data.filetree import read_tree
from cudacnn.data.image_folder import (RESIZE_POLICY, SIZE, SPLIT_RULE, TEST_FRACTION, find_class_root, find_root,
                                       fit_image, read_class_folders, read_image_folder)
from cudacnn.errors import DataError

log = logging.getLogger(__name__)
DEFAULT_SOURCE = "cifar10"
# The bundled sample (a stratified 2,500-image JPEG subset of CIFAR-10; see data/sample/README.md).
SAMPLE = "sample"
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


def sample_path() -> Path:
    return Path(__file__).resolve().parent / "sample" / "cifar10-sample.tar.gz"


def check_image_size(size: int) -> int:
    if not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"--image-size {size} is out of range; give a side length in pixels from "
                        f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default {SIZE})")
    return size


def default_data_dir() -> Path:
    return Path(os.environ.get("CUDACNN_DATA_DIR") or Path.home() / ".cache" / "cudacnn" / "data")


def resolve_source(source: str | os.PathLike | None, data_dir: Path | None = None, quiet: bool = False,
                   fallback_to_sample: bool = False) -> Path:
    """A local path for `source`: an official name is downloaded (once) into data_dir, 'sample' is the bundled
    sample. With no source named at all (no argument, no CUDACNN_DATA) and `fallback_to_sample`, a failed
    download of official CIFAR-10 says why and falls back to the sample."""
    named = source or os.environ.get("CUDACNN_DATA")
    source = str(named or DEFAULT_SOURCE)
    if source == SAMPLE:
        return sample_path()
    if source in OFFICIAL:
        try:
            return download(OFFICIAL[source], data_dir or default_data_dir(), quiet=quiet)
        except DownloadError as exc:
            if named or not fallback_to_sample:
                raise
            log.warning("warning: %s\nwarning: TRAINING ON THE BUNDLED SAMPLE INSTEAD (2,000 train / 500 test JPEG "
                        "images of CIFAR-10): a demonstration, not a CIFAR-10 result. Pass --data for real data.", exc)
            return sample_path()
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join([*OFFICIAL, SAMPLE])
        raise DataError(f"data source {source} does not exist; give a path to an archive or folder, "
                        f"or one of: {names}")
    return path


def decoding_key(image_size: int) -> str:
    """What, besides the source's files, the decoded arrays depend on (part of the cache fingerprint)."""
    return f"size={image_size};resize={RESIZE_POLICY};split={TEST_FRACTION},{SPLIT_RULE}"


def resize_split(split: Split, size: int) -> Split:
    """A split of fixed-size arrays (an official CIFAR archive) brought to size x size by the image policy."""
    from PIL import Image

    if split.images.shape[1:3] == (size, size):
        return split
    images = np.stack([fit_image(Image.fromarray(image), size) for image in split.images]) if len(split) else \
        np.zeros((0, size, size, 3), np.uint8)
    return Split(images, split.labels)


def read_source(path: Path, image_size: int = SIZE, quiet: bool = True) -> Dataset:
    """Decode a source with no cache involved, its images brought to image_size x image_size."""
    check_image_size(image_size)
    tree = read_tree(path)
    layout = detect_official(tree)
    if layout:
        reader = read_binary if layout.endswith("-bin") else read_python
        dataset = reader(tree, layout, str(path))
        dataset.train, dataset.test = resize_split(dataset.train, image_size), resize_split(dataset.test, image_size)
        return dataset
    root = find_root(tree)
    if root is not None:
        return read_image_folder(tree, root, str(path), image_size, quiet)
    root = find_class_root(tree)
    if root is not None:
        return read_class_folders(tree, root, str(path), image_size, quiet)
    raise DataError(f"{path} is not a layout cudacnn knows: expected an official CIFAR-10/100 archive "
                    "(binary or python version), an image-folder tree <root>/{train,test}/<class>/<image>, or "
                    "class folders <root>/<class>/<image> (at least two classes) to split into train/test")


def load_dataset(source: str | os.PathLike | None = None, cache_dir: Path | None = None,
                 data_dir: Path | None = None, use_cache: bool = True, quiet: bool = False,
                 image_size: int = SIZE, fallback_to_sample: bool = False) -> Dataset:
    """Load `source` (default: CUDACNN_DATA, else official CIFAR-10) at image_size x image_size, decoding it
    only on the first call. `fallback_to_sample`: see resolve_source."""
    check_image_size(image_size)
    path = resolve_source(source, Path(data_dir) if data_dir else None, quiet=quiet,
                          fallback_to_sample=fallback_to_sample)
    if not use_cache:
        return read_source(path, image_size, quiet)
    print_ = cache.fingerprint(path, decoding_key(image_size))
    target = cache.cache_path(Path(cache_dir) if cache_dir else cache.default_cache_dir(), path, print_, image_size)
    dataset = cache.load(target, print_)
    if dataset is not None:
        return dataset
    start = time.perf_counter()
    if not quiet:
        log.info("decoding %s (first use; later loads read the cache)", path)
    dataset = read_source(path, image_size, quiet)
    cache.save(dataset, target, print_)
    if not quiet:
        log.info("decoded %d train / %d test images in %.1f s; cached at %s",
                 len(dataset.train), len(dataset.test), time.perf_counter() - start, target)
    return dataset
