"""Image-folder trees: <root>/{train,test}/<class>/*.{png,jpg,jpeg}; class order = sorted folder names."""

from __future__ import annotations

import io
import os
import posixpath
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from cudacnn.data.dataset import Dataset, Split
from cudacnn.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIZE = 32
Tree = Mapping[str, Callable[[], bytes]]


def find_root(tree: Tree) -> str | None:
    """The folder prefix under which train/<class>/<image> and test/<class>/<image> live, if any."""
    roots: dict[str, set[str]] = {}
    for name in tree:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in ("train", "test") and name.lower().endswith(IMAGE_SUFFIXES):
            roots.setdefault("/".join(parts[:-3]), set()).add(parts[-3])
    complete = sorted(root for root, splits in roots.items() if splits == {"train", "test"})
    return complete[0] if complete else None


def _list_split(tree: Tree, root: str, split: str) -> dict[str, list[str]]:
    prefix = posixpath.join(root, split) + "/" if root else split + "/"
    by_class: dict[str, list[str]] = {}
    for name in tree:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):].split("/")
        if len(rest) == 1:
            continue  # a stray file beside the class folders
        by_class.setdefault(rest[0], [])
        if len(rest) == 2 and rest[1].lower().endswith(IMAGE_SUFFIXES):
            by_class[rest[0]].append(name)
    for files in by_class.values():
        files.sort()
    return by_class


def decode_image(item: tuple[str, bytes]) -> np.ndarray | str:
    """Decode one image; on a problem return a message instead (so a worker process never raises)."""
    name, data = item
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != (SIZE, SIZE):
                return f"{name} is {image.size[0]}x{image.size[1]}, expected {SIZE}x{SIZE}; resize it"
            if image.mode != "RGB":
                return f"{name} has mode {image.mode}, expected RGB; convert it to 3-channel RGB"
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{name} is not a readable image ({exc}); replace or remove it"


def _ignore_sigint() -> None:
    # Ctrl-C signals the whole process group; a worker killed by it mid-read or mid-write breaks the pool,
    # whose shutdown can then hang forever. Only the main process handles it (see decode_images).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_images(items: list[tuple[str, bytes]], workers: int | None = None) -> np.ndarray:
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(items) >= 4000:
        # a chunk of 512 32x32 images decodes in some 20-50 ms; on Ctrl-C, map's iterator cancels the queued
        # chunks itself, and the pool's exit waits only for the ones its workers hold
        with ProcessPoolExecutor(workers, initializer=_ignore_sigint) as pool:
            decoded = list(pool.map(decode_image, items, chunksize=512))
    else:
        decoded = [decode_image(item) for item in items]
    for result in decoded:
        if isinstance(result, str):
            raise DataError(result)
    if not decoded:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return np.stack(decoded)


def read_image_folder(tree: Tree, root: str, source: str) -> Dataset:
    train_files = _list_split(tree, root, "train")
    test_files = _list_split(tree, root, "test")
    classes = sorted(train_files)
    if sorted(test_files) != classes:
        raise DataError(f"{source}: train classes {classes} and test classes {sorted(test_files)} differ; "
                        "give both splits the same class folders")
    for split, by_class in (("train", train_files), ("test", test_files)):
        for cls, files in by_class.items():
            if not files:
                raise DataError(f"{source}: class folder {split}/{cls} holds no .png/.jpg/.jpeg images; "
                                "add images or remove the folder")
    splits = []
    for by_class in (train_files, test_files):
        items = [(name, tree[name]()) for cls in classes for name in by_class[cls]]
        labels = np.concatenate([np.full(len(by_class[cls]), i, np.int64) for i, cls in enumerate(classes)])
        splits.append(Split(decode_images(items), labels))
    name = posixpath.basename(root) if root else "images"
    return Dataset(name or "images", classes, splits[0], splits[1], source=source)
