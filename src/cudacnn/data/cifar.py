"""Official CIFAR-10 / CIFAR-100 archives: the binary version (parsed record by record) and the
python version (read through a restricted unpickler that can never run code)."""

from __future__ import annotations

import io
import pickle
import posixpath
from typing import Callable, Mapping

import numpy as np

from cudacnn.data.dataset import Dataset, Split
from cudacnn.download import Published
from cudacnn.errors import DataError

IMAGE_BYTES = 3 * 32 * 32


class OfficialArchive(Published):
    """An official CIFAR archive, with its published MD5."""

    def __init__(self, name: str, url: str, md5: str, filename: str):
        super().__init__(name, url, filename, md5=md5)


# The official addresses and published checksums.
OFFICIAL = {
    "cifar10": OfficialArchive("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                               "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-binary.tar.gz"),
    "cifar100": OfficialArchive("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                                "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary.tar.gz"),
    "cifar10-python": OfficialArchive("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                      "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz"),
    "cifar100-python": OfficialArchive("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                       "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz"),
}

Tree = Mapping[str, Callable[[], bytes]]


def _find(tree: Tree, basename: str) -> str | None:
    for name in tree:
        if posixpath.basename(name) == basename:
            return name
    return None


def detect_official(tree: Tree) -> str | None:
    """Which official layout a file tree holds: 'cifar10-bin', 'cifar100-bin', 'cifar10-py', 'cifar100-py'."""
    if _find(tree, "data_batch_1.bin"):
        return "cifar10-bin"
    if _find(tree, "fine_label_names.txt") and _find(tree, "train.bin"):
        return "cifar100-bin"
    if _find(tree, "data_batch_1") and _find(tree, "batches.meta"):
        return "cifar10-py"
    meta = _find(tree, "meta")
    if meta and posixpath.join(posixpath.dirname(meta), "train") in tree:  # meta and train side by side, at any depth
        return "cifar100-py"
    return None


def _member(tree: Tree, folder: str, basename: str, source: str) -> bytes:
    name = posixpath.join(folder, basename) if folder else basename
    if name not in tree:
        raise DataError(f"{source} lacks {name}: the archive is incomplete; download it again")
    return tree[name]()


def _records_to_images(raw: np.ndarray) -> np.ndarray:
    # Each record stores 1024 red, 1024 green, then 1024 blue bytes, rows first.
    return raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _parse_binary(data: bytes, label_bytes: int, label_index: int, name: str, source: str) -> Split:
    record = label_bytes + IMAGE_BYTES
    if len(data) == 0 or len(data) % record:
        raise DataError(f"{source}: {name} has {len(data)} bytes, not a whole number of {record}-byte records; "
                        "the archive is truncated or corrupt, download it again")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return Split(_records_to_images(records[:, label_bytes:]), records[:, label_index].astype(np.int64))


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def _names(text: bytes) -> list[str]:
    return [line.strip() for line in text.decode("utf-8").splitlines() if line.strip()]


def _check_labels(split: Split, classes: list[str], source: str) -> None:
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(classes)):
        raise DataError(f"{source}: labels outside 0..{len(classes) - 1}; the archive is corrupt, download it again")


def read_binary(tree: Tree, layout: str, source: str) -> Dataset:
    if layout == "cifar10-bin":
        folder = posixpath.dirname(_find(tree, "data_batch_1.bin"))
        train = _concat([_parse_binary(_member(tree, folder, f"data_batch_{i}.bin", source), 1, 0,
                                       f"data_batch_{i}.bin", source) for i in range(1, 6)])
        test = _parse_binary(_member(tree, folder, "test_batch.bin", source), 1, 0, "test_batch.bin", source)
        classes = _names(_member(tree, folder, "batches.meta.txt", source))
        name = "cifar10"
    else:
        folder = posixpath.dirname(_find(tree, "fine_label_names.txt"))
        # CIFAR-100 records: coarse label, fine label, image. We train on the 100 fine labels.
        train = _parse_binary(_member(tree, folder, "train.bin", source), 2, 1, "train.bin", source)
        test = _parse_binary(_member(tree, folder, "test.bin", source), 2, 1, "test.bin", source)
        classes = _names(_member(tree, folder, "fine_label_names.txt", source))
        name = "cifar100"
    for split in (train, test):
        _check_labels(split, classes, source)
    return Dataset(name, classes, train, test, source=source)


# ---------------------------------------------------------------- python version

class RestrictedUnpickler(pickle.Unpickler):
    """Accepts only what the official python batches contain: numpy arrays and plain containers.
    Any other global (os.system, builtins.eval, ...) is refused before it can be called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, name: str, source: str) -> dict:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{source}: {name} is not a plain CIFAR batch ({exc}); it may be tampered with. "
                        "Use the official archive or the binary version") from exc
    except Exception as exc:  # truncated or garbled pickle streams raise many types
        raise DataError(f"{source}: {name} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                        "download it again") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{source}: {name} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_split(batch: dict, label_key: str, name: str, source: str) -> Split:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{source}: {name} lacks the key {exc}; it is not an official CIFAR batch") from exc
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or len(labels) != len(data):
        raise DataError(f"{source}: {name} has data of shape {data.shape} and {len(labels)} labels; "
                        f"expected (N, {IMAGE_BYTES}) and N labels")
    return Split(_records_to_images(data), labels)


def _class_names(meta: dict, key: str, name: str, source: str) -> list[str]:
    if key not in meta:
        raise DataError(f"{source}: {name} lacks the key '{key}'; it is not an official CIFAR meta file")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in meta[key]]


def read_python(tree: Tree, layout: str, source: str) -> Dataset:
    def load(folder: str, basename: str) -> dict:
        return safe_unpickle(_member(tree, folder, basename, source), basename, source)

    if layout == "cifar10-py":
        folder = posixpath.dirname(_find(tree, "data_batch_1"))
        train = _concat([_batch_split(load(folder, f"data_batch_{i}"), "labels", f"data_batch_{i}", source)
                         for i in range(1, 6)])
        test = _batch_split(load(folder, "test_batch"), "labels", "test_batch", source)
        classes = _class_names(load(folder, "batches.meta"), "label_names", "batches.meta", source)
        name = "cifar10"
    else:
        folder = posixpath.dirname(_find(tree, "meta"))
        train = _batch_split(load(folder, "train"), "fine_labels", "train", source)
        test = _batch_split(load(folder, "test"), "fine_labels", "test", source)
        classes = _class_names(load(folder, "meta"), "fine_label_names", "meta", source)
        name = "cifar100"
    for split in (train, test):
        _check_labels(split, classes, source)
    return Dataset(name, classes, train, test, source=source)
