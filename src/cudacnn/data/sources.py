"""Resolve a source (a name like 'cifar10', or a path) into a Dataset, through the decoded cache."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cudacnn.data import cache
from cudacnn.data.cifar import OFFICIAL, detect_official, read_binary, read_python
from cudacnn.data.dataset import Dataset
from cudacnn.data.download import download
from cudacnn.data.filetree import read_tree
from cudacnn.data.image_folder import find_root, read_image_folder
from cudacnn.errors import DataError

log = logging.getLogger(__name__)
DEFAULT_SOURCE = "cifar10"


def default_data_dir() -> Path:
    return Path(os.environ.get("CUDACNN_DATA_DIR") or Path.home() / ".cache" / "cudacnn" / "data")


def resolve_source(source: str | os.PathLike | None, data_dir: Path | None = None, quiet: bool = False) -> Path:
    """A local path for `source`: an official name is downloaded (once) into data_dir."""
    source = str(source or os.environ.get("CUDACNN_DATA") or DEFAULT_SOURCE)
    if source in OFFICIAL:
        return download(OFFICIAL[source], data_dir or default_data_dir(), quiet=quiet)
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(OFFICIAL)
        raise DataError(f"data source {source} does not exist; give a path to an archive or folder, "
                        f"or one of: {names}")
    return path


def read_source(path: Path) -> Dataset:
    """Decode a source with no cache involved."""
    tree = read_tree(path)
    layout = detect_official(tree)
    if layout and layout.endswith("-bin"):
        return read_binary(tree, layout, str(path))
    if layout:
        return read_python(tree, layout, str(path))
    root = find_root(tree)
    if root is not None:
        return read_image_folder(tree, root, str(path))
    raise DataError(f"{path} is not a layout cudacnn knows: expected an official CIFAR-10/100 archive "
                    "(binary or python version) or an image-folder tree <root>/{train,test}/<class>/*.png|jpg")


def load_dataset(source: str | os.PathLike | None = None, cache_dir: Path | None = None,
                 data_dir: Path | None = None, use_cache: bool = True, quiet: bool = False) -> Dataset:
    """Load `source` (default: CUDACNN_DATA, else official CIFAR-10), decoding it only on the first call."""
    path = resolve_source(source, Path(data_dir) if data_dir else None, quiet=quiet)
    if not use_cache:
        return read_source(path)
    print_ = cache.fingerprint(path)
    target = cache.cache_path(Path(cache_dir) if cache_dir else cache.default_cache_dir(), path, print_)
    dataset = cache.load(target, print_)
    if dataset is not None:
        return dataset
    start = time.perf_counter()
    if not quiet:
        log.info("decoding %s (first use; later loads read the cache)", path)
    dataset = read_source(path)
    cache.save(dataset, target, print_)
    if not quiet:
        log.info("decoded %d train / %d test images in %.1f s; cached at %s",
                 len(dataset.train), len(dataset.test), time.perf_counter() - start, target)
    return dataset
