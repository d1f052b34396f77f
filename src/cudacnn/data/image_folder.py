"""Image-folder trees, of any image size and mode:

    <root>/{train,test}/<class>/<image>   the given split, or
    <root>/<class>/<image>                one class-folder tree, split into train/test by a hash of each
                                          file's path (recorded with the dataset; see split_classes)

Class order = sorted folder names. Every image becomes an RGB uint8 array of size x size (see fit_image for the
resize policy); the size is read from the header and checked before any pixel is decoded."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import logging
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cudacnn.data.dataset import Dataset, Split
from cudacnn.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 32  # the default model input (CIFAR's size); --image-size changes it
# Larger images are refused from their header, before decoding: 64 megapixels covers phone and DSLR photos
# (a 48 MP photo is 8064x6048) and keeps one decoded image under 200 MB.
MAX_PIXELS = 64_000_000
# How an image of another size or shape becomes size x size (part of the cache fingerprint: change it when the
# policy changes). The same policy as torchvision's eval transform Resize(size) + CenterCrop(size).
RESIZE_POLICY = "shorter-side-bilinear-antialias+center-crop"
# A class-folder tree with no train/test split gives about this share of every class to the test split, each
# file by a hash of its path (split_classes): the test set never changes between runs on the same folder, and
# adding images never moves the ones already there.
TEST_FRACTION = 0.2
SPLIT_RULE = "sha256 of the path below the class root, as a fraction in [0, 1): under test_fraction is test"
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
Tree = Mapping[str, Callable[[], bytes]]
log = logging.getLogger(__name__)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not posixpath.basename(name).startswith(".")


# ------------------------------------------------------------------ layouts

def find_root(tree: Tree) -> str | None:
    """The folder prefix under which train/<class>/<image> and test/<class>/<image> live, if any."""
    roots: dict[str, set[str]] = {}
    for name in tree:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in ("train", "test") and is_image_name(name):
            roots.setdefault("/".join(parts[:-3]), set()).add(parts[-3])
    complete = sorted(root for root, splits in roots.items() if splits == {"train", "test"})
    return complete[0] if complete else None


def find_class_root(tree: Tree) -> str | None:
    """The folder whose subfolders are classes (<root>/<class>/<image>) holding the most images, if any
    folder has at least two such subfolders."""
    counts: dict[str, dict[str, int]] = {}
    for name in tree:
        parts = name.split("/")
        if len(parts) >= 2 and is_image_name(name):
            by_class = counts.setdefault("/".join(parts[:-2]), {})
            by_class[parts[-2]] = by_class.get(parts[-2], 0) + 1
    candidates = [(-sum(c.values()), root) for root, c in counts.items() if len(c) >= 2]
    return min(candidates)[1] if candidates else None


def _list_classes(tree: Tree, prefix: str) -> dict[str, list[str]]:
    """class -> sorted image names, for the class folders directly under `prefix` (which ends in '/' or is '')."""
    by_class: dict[str, list[str]] = {}
    for name in tree:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):].split("/")
        if len(rest) == 1:
            continue  # a stray file beside the class folders
        by_class.setdefault(rest[0], [])
        if len(rest) == 2 and is_image_name(name):
            by_class[rest[0]].append(name)
    for files in by_class.values():
        files.sort()
    return by_class


def _list_split(tree: Tree, root: str, split: str) -> dict[str, list[str]]:
    return _list_classes(tree, posixpath.join(root, split) + "/" if root else split + "/")


def _check_nonempty(by_class: dict[str, list[str]], where: str, source: str) -> None:
    for cls, files in by_class.items():
        if not files:
            raise DataError(f"{source}: class folder {where}{cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add images or remove the folder")


# ------------------------------------------------------------------ decoding

def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): the shorter side resized to `size` (bilinear, antialiased), then the centre
    size x size square. An image already size x size keeps its pixels exactly."""
    if image.mode in HIGH_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale them down instead (65535 -> 255)
        values = np.asarray(image, dtype=np.float64)
        values = values / 257 if image.mode != "F" else values
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), "L")
    if image.mode != "RGB":
        # as torchvision's and timm's folder loaders do: palette, greyscale and CMYK become RGB, an alpha
        # channel is dropped
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA") else image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        short = min(w, h)
        left, top = (w - short) / 2, (h - short) / 2
        # one resample of the centre square: the same as resizing the shorter side and cropping, without
        # rounding the intermediate size
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + short, top + short))
    return np.asarray(image, dtype=np.uint8)


def decode_image(item: tuple[str, bytes | Path], size: int = SIZE) -> np.ndarray | str:
    """Decode one image (its bytes, or a file to read) to (size, size, 3) uint8; on a problem return a message
    instead (so a worker process never raises)."""
    name, data = item
    try:
        if isinstance(data, Path):
            data = data.read_bytes()
        with warnings.catch_warnings():
            # Pillow warns (and later refuses) of huge images itself; our own, lower limit below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            w, h = image.size  # from the header: nothing decoded yet
            if w * h > MAX_PIXELS:
                return (f"{name} is {w}x{h} ({w * h:,} pixels), over the limit of {MAX_PIXELS:,} (a decompression "
                        "bomb, or a huge scan); shrink it below the limit or remove it")
            if image.format == "JPEG" and (w, h) != (size, size):
                # decode at the smallest 1/2, 1/4 or 1/8 scale still at least size x size: far less work for
                # a large photo, and the DCT scaling is itself an antialiased downscale
                image.draft("RGB", (size, size))
            image.load()
            image = ImageOps.exif_transpose(image)  # a phone photo stored sideways is shown, and learned, upright
            return fit_image(image, size)
    except Image.DecompressionBombError as exc:  # so large that Pillow refuses it already when reading the header
        return (f"{name} is over the limit of {MAX_PIXELS:,} pixels ({exc}); shrink it below the limit or remove it")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"{name} is not a readable image ({exc}); replace or remove it"


def _ignore_sigint() -> None:
    # Ctrl-C signals the whole process group; a worker killed by it mid-read or mid-write breaks the pool,
    # whose shutdown can then hang forever. Only the main process handles it (see decode_images).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_chunk(items: list[tuple[str, bytes | Path]], size: int) -> list[np.ndarray | str]:
    return [decode_image(item, size) for item in items]


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def decode_images(items: list[tuple[str, bytes | Path]], size: int = SIZE, workers: int | None = None,
                  quiet: bool = True, description: str = "decoding") -> np.ndarray:
    """(N, size, size, 3) uint8 of the items, decoded on all cores (up to 32; or CUDACNN_DECODE_WORKERS) when
    there are many, with a progress bar (or, without a terminal, a line every few seconds) unless quiet. The
    first bad image raises DataError."""
    from cudacnn.progress import progress_bar

    # all cores, up to 32 (a cap, not a measured optimum: each worker costs start-up time and memory, and one
    # main process collects every result)
    workers = workers or int(os.environ.get("CUDACNN_DECODE_WORKERS") or 0) or min(32, os.cpu_count() or 1)
    out = np.empty((len(items), size, size, 3), np.uint8)
    # A 32x32 JPEG decodes in ~0.1 ms: such images pay for a pool only by the thousands. Photos (large files)
    # take milliseconds each, and a folder's files are read by the workers too: a pool pays off sooner.
    large = any(isinstance(data, Path) or len(data) > 16_384 for _, data in items[:64])
    parallel = workers > 1 and len(items) >= (256 if large else 4000)
    # chunks of tens of milliseconds to a second of work: every core busy, the bar moving
    chunk = 64 if large else 512
    done = 0
    with progress_bar(description, len(items), unit="images", quiet=quiet) as bar:
        if parallel:
            with ProcessPoolExecutor(workers, initializer=_ignore_sigint) as pool:
                results = pool.map(partial(_decode_chunk, size=size), _chunks(items, chunk))
                try:
                    done = _collect(results, out, bar)
                finally:
                    # on a bad image or Ctrl-C, closing map's iterator cancels the queued chunks: the pool's
                    # exit then waits only for the ones its workers hold
                    results.close()
        else:
            done = _collect((_decode_chunk(part, size) for part in _chunks(items, chunk)), out, bar)
    assert done == len(items)
    return out


def _collect(results, out: np.ndarray, bar) -> int:
    done = 0
    for part in results:
        for result in part:
            if isinstance(result, str):
                raise DataError(result)
            out[done] = result
            done += 1
        bar.advance(len(part))
    return done


def _payload(tree: Tree, name: str) -> bytes | Path:
    """A folder's file as its path (a worker reads it: the main process never holds every file's bytes),
    an archive member as its bytes."""
    reader = tree[name]
    path = getattr(reader, "path", None)
    return path if isinstance(path, Path) else reader()


def _decode_classes(tree: Tree, by_class: dict[str, list[str]], classes: list[str], size: int, quiet: bool,
                    what: str) -> Split:
    items = [(name, _payload(tree, name)) for cls in classes for name in by_class.get(cls, [])]
    labels = [np.full(len(by_class.get(cls, [])), i, np.int64) for i, cls in enumerate(classes)]
    return Split(decode_images(items, size, quiet=quiet, description=what),
                 np.concatenate(labels) if labels else np.zeros(0, np.int64))


def _dataset_name(root: str, source: str) -> str:
    """The tree's root folder, else the folder or archive given (without its archive suffix)."""
    name = posixpath.basename(root) or Path(source).name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        name = name.removesuffix(suffix)
    return name or "images"


def read_image_folder(tree: Tree, root: str, source: str, size: int = SIZE, quiet: bool = True) -> Dataset:
    """A <root>/{train,test}/<class>/<image> tree."""
    train_files = _list_split(tree, root, "train")
    test_files = _list_split(tree, root, "test")
    classes = sorted(train_files)
    if sorted(test_files) != classes:
        raise DataError(f"{source}: train classes {classes} and test classes {sorted(test_files)} differ; "
                        "give both splits the same class folders")
    _check_nonempty(train_files, "train/", source)
    _check_nonempty(test_files, "test/", source)
    train = _decode_classes(tree, train_files, classes, size, quiet, "decoding train images")
    test = _decode_classes(tree, test_files, classes, size, quiet, "decoding test images")
    return Dataset(_dataset_name(root, source), classes, train, test, source=source)


def split_fraction(relative_name: str) -> float:
    """Where a file falls in [0, 1): the first 8 bytes of the sha256 of its path below the class root. The file's
    own name alone decides, so adding or removing other files never moves it between train and test."""
    digest = hashlib.sha256(relative_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_classes(by_class: dict[str, list[str]], classes: list[str],
                  root: str = "") -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The hashed train/test split of a class-folder tree: a file whose split_fraction (of its name below `root`,
    e.g. "cat/001.png") is under TEST_FRACTION goes to test. A class of two or more files with none there gives
    its lowest-fraction file to test; one whose files all fall there keeps its highest for training."""
    prefix = root + "/" if root else ""
    train, test = {}, {}
    for cls in classes:
        fraction = {name: split_fraction(name.removeprefix(prefix)) for name in by_class[cls]}
        chosen = {name for name, f in fraction.items() if f < TEST_FRACTION}
        ranked = sorted(fraction, key=fraction.get)
        if len(ranked) >= 2 and not chosen:
            chosen = {ranked[0]}
        if len(ranked) >= 2 and len(chosen) == len(ranked):
            chosen.discard(ranked[-1])
        test[cls] = [name for name in by_class[cls] if name in chosen]
        train[cls] = [name for name in by_class[cls] if name not in chosen]
    return train, test


def read_class_folders(tree: Tree, root: str, source: str, size: int = SIZE, quiet: bool = True) -> Dataset:
    """A <root>/<class>/<image> tree with no train/test split of its own: split by split_classes, recorded in
    the dataset's `info` (the rule and every test image's name)."""
    by_class = _list_classes(tree, root + "/" if root else "")
    by_class = {cls: files for cls, files in by_class.items() if files}  # folders of other things are not classes
    classes = sorted(by_class)
    used = {name for files in by_class.values() for name in files}
    outside = sum(1 for name in tree if is_image_name(name) and name not in used)
    if outside:
        log.warning("warning: %s: %d images lie outside the class folders of %s and are not used", source, outside,
                    root or "the top level")
    train_files, test_files = split_classes(by_class, classes, root)
    train = _decode_classes(tree, train_files, classes, size, quiet, "decoding train images")
    test = _decode_classes(tree, test_files, classes, size, quiet, "decoding test images")
    info = {"split": {"rule": SPLIT_RULE, "test_fraction": TEST_FRACTION,
                      "test_files": [n for cls in classes for n in test_files[cls]]}}
    return Dataset(_dataset_name(root, source), classes, train, test, source=source, info=info)
