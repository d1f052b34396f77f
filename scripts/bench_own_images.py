"""Decode + resize throughput of cudacnn's own image loader on a folder of mixed-size photos.

Generates (in a temporary folder, removed afterwards) a class-folder tree of N images with random sides of
64..640 px: mostly RGB JPEGs, some greyscale JPEGs, RGB PNGs and RGBA PNGs. Then times, per --size,
`read_source(folder, image_size=S)` (listing, the seeded stratified train/test split, decoding with the
header check, RGB conversion, shorter-side resize + centre crop, stacking) on all cores, and the same
decoder on one core over a subset, and prints one markdown table line per size:

    python scripts/bench_own_images.py                      # 20,000 images, size 32, all cores
    python scripts/bench_own_images.py --images 2000 --sizes 32 224 --workers 2

The files were just written, so they come from the page cache: this measures decoding, not the disk."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cudacnn.data import image_folder
from cudacnn.data.image_folder import decode_images
from cudacnn.data.sources import read_source

CLASSES = 10


def make_image(args: tuple[Path, int]) -> int:
    """Write image number i (its kind, size and content drawn from i): a smooth random picture plus noise."""
    root, i = args
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(64, 641, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    kind = i % 20  # 14 RGB JPEG, 2 greyscale JPEG, 2 RGB PNG, 2 RGBA PNG in every 20
    folder = root / f"class{i % CLASSES}"
    if kind < 14:
        path = folder / f"{i:06d}.jpg"
        image.save(path, "JPEG", quality=90)
    elif kind < 16:
        path = folder / f"{i:06d}.jpg"
        image.convert("L").save(path, "JPEG", quality=90)
    elif kind < 18:
        path = folder / f"{i:06d}.png"
        image.save(path, "PNG", compress_level=1)
    else:
        path = folder / f"{i:06d}.png"
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(128, 256, (h, w), dtype=np.uint8)))
        rgba.save(path, "PNG", compress_level=1)
    return path.stat().st_size


def generate(root: Path, n: int, workers: int) -> int:
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(make_image, [(root, i) for i in range(n)], chunksize=64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="--image-size values, one line each")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    parser.add_argument("--serial-images", type=int, default=1000, help="subset timed on one core")
    parser.add_argument("--dir", type=Path, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="cudacnn-bench-", dir=args.dir))
    try:
        root = base / "photos"
        start = time.perf_counter()
        total_bytes = generate(root, args.images, args.workers)
        print(f"generated {args.images:,} images ({total_bytes / 1e6:,.0f} MB) in {time.perf_counter() - start:.1f} s "
              f"in {root}")
        os.environ["CUDACNN_DECODE_WORKERS"] = str(args.workers)  # the loader's own setting
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Pillow {Image.__version__}\n")
        print("| images | size | policy | workers | seconds | images/s | MB/s | 1-core images/s | speed-up |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        every = sorted(p for p in root.rglob("*") if p.is_file())
        files = every[:: max(1, len(every) // args.serial_images)][: args.serial_images]  # all kinds, all classes
        for size in args.sizes:
            start = time.perf_counter()
            dataset = read_source(root, image_size=size)
            seconds = time.perf_counter() - start
            n = len(dataset.train) + len(dataset.test)
            assert n == args.images and dataset.train.images.shape[1:] == (size, size, 3)
            start = time.perf_counter()
            decode_images([(str(p), p) for p in files], size, workers=1)
            serial = len(files) / (time.perf_counter() - start)
            rate = n / seconds
            print(f"| {n:,} | {size} | {image_folder.RESIZE_POLICY} | {args.workers} | {seconds:.2f} | {rate:,.0f} | "
                  f"{total_bytes / 1e6 / seconds:,.0f} | {serial:,.0f} | {rate / serial:.1f}x |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
