"""Build archives in the exact official CIFAR byte layouts, and image-folder trees, for the tests."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def to_records(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official 3072-byte rows: all red bytes, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, files: dict[str, bytes], compression: str = "gz") -> Path:
    with tarfile.open(path, f"w:{compression}") as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return path


def cifar10_binary_files(per_batch: int = 6, seed: int = 0):
    """Files of cifar-10-binary.tar.gz, and the (images, labels) they hold for train and test."""
    files, train = {}, []
    for i in range(1, 7):
        images, labels = random_images(per_batch, seed + i)
        name = f"data_batch_{i}.bin" if i <= 5 else "test_batch.bin"
        rows = np.concatenate([labels.astype(np.uint8)[:, None], to_records(images)], axis=1)
        files[f"cifar-10-batches-bin/{name}"] = rows.tobytes()
        train.append((images, labels))
    files["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(CIFAR10_CLASSES) + "\n\n").encode()
    cat = lambda parts, k: np.concatenate([p[k] for p in parts])  # noqa: E731
    return files, (cat(train[:5], 0), cat(train[:5], 1)), train[5]


def cifar100_binary_files(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    files, splits = {}, []
    for name in ("train.bin", "test.bin"):
        images, _ = random_images(n, int(rng.integers(1 << 30)))
        fine = rng.integers(0, 100, n).astype(np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        files[f"cifar-100-binary/{name}"] = np.concatenate(
            [coarse[:, None], fine[:, None], to_records(images)], axis=1).tobytes()
        splits.append((images, fine.astype(np.int64)))
    files["cifar-100-binary/fine_label_names.txt"] = "\n".join(f"fine{i:02d}" for i in range(100)).encode()
    files["cifar-100-binary/coarse_label_names.txt"] = "\n".join(f"coarse{i:02d}" for i in range(20)).encode()
    return files, splits[0], splits[1]


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes (SHORT_BINSTRING / BINSTRING), as the official files do
    (they were pickled by Python 2's cPickle with protocol 2)."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar10_python_files(per_batch: int = 6, seed: int = 0):
    files, parts = {}, []
    for i in range(1, 7):
        images, labels = random_images(per_batch, seed + 100 + i)
        name = f"data_batch_{i}" if i <= 5 else "test_batch"
        batch = {b"batch_label": f"batch {i}".encode(), b"labels": [int(v) for v in labels],
                 b"data": to_records(images), b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]}
        files[f"cifar-10-batches-py/{name}"] = py2_pickle(batch)
        parts.append((images, labels))
    files["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    train = (np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]]))
    return files, train, parts[5]


def cifar100_python_files(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    files, splits = {}, []
    for name in ("train", "test"):
        images, _ = random_images(n, int(rng.integers(1 << 30)))
        fine = rng.integers(0, 100, n)
        files[f"cifar-100-python/{name}"] = py2_pickle(
            {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": [int(v) for v in fine],
             b"coarse_labels": [int(v) // 5 for v in fine], b"data": to_records(images)})
        splits.append((images, fine.astype(np.int64)))
    files["cifar-100-python/meta"] = py2_pickle({b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
                                                 b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return files, splits[0], splits[1]


class Exploit:
    """A pickle payload that would create `marker` if it were ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def png_bytes(image: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if mode:
        pil = pil.convert(mode)
    pil.save(buffer, format=fmt)
    return buffer.getvalue()


def image_folder_files(classes=("cat", "dog", "frog"), per_class: int = 3, root: str = "tiny", seed: int = 0):
    """Files of <root>/{train,test}/<class>/NNNN.png, and the expected (images, labels) per split."""
    files, expected = {}, {}
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            for j in range(per_class):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                files[f"{root}/{split}/{cls}/{j:04d}.png"] = png_bytes(image)
                images.append(image)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels))
    return files, expected


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root
