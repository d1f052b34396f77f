"""`cudacnn data info SOURCE`, `cudacnn data download NAME` and `cudacnn data cache [--clear NAME|all]`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from cudacnn.data.cifar import OFFICIAL
from cudacnn.data.dataset import channel_stats
from cudacnn.download import download
from cudacnn.data.sources import default_data_dir, load_dataset


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect and download data sources")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="splits, per-class counts, channel mean/std and cache location")
    info.add_argument("source", nargs="?", help="archive, folder, official name or 'sample' "
                      "(default: CUDACNN_DATA or cifar10)")
    info.add_argument("--cache-dir", type=Path, help="where decoded caches live (default: CUDACNN_CACHE)")
    info.add_argument("--image-size", type=int, default=32, help="side the images are brought to (default 32)")
    info.set_defaults(func=run_info)
    get = sub.add_parser("download", help="download and verify an official archive")
    get.add_argument("name", choices=sorted(OFFICIAL))
    get.add_argument("--dir", type=Path, help="target folder (default: CUDACNN_DATA_DIR)")
    get.set_defaults(func=run_download)
    cached = sub.add_parser("cache", help="list the cached sources (decoded .npz caches and downloaded archives): "
                            "source, size, date; --clear deletes them")
    cached.add_argument("--clear", nargs="?", const="all", metavar="NAME|all",
                        help="delete the caches of one source (its file name, source path, official name, or sample: "
                             "its decoded caches), "
                             "or all of them (the default with a bare --clear)")
    cached.add_argument("--cache-dir", type=Path, help="where decoded caches live (default: CUDACNN_CACHE)")
    cached.add_argument("--dir", type=Path, help="where downloads live (default: CUDACNN_DATA_DIR)")
    cached.set_defaults(func=run_cache)


def run_info(args) -> int:
    dataset = load_dataset(args.source, cache_dir=args.cache_dir, image_size=args.image_size)
    console = Console()
    console.print(f"[bold]{dataset.name}[/] from {dataset.source}, {dataset.image_size}x{dataset.image_size} RGB")
    console.print(f"cache: {dataset.cache_path}")
    split = dataset.info.get("split")
    if split:
        console.print(f"train/test: the folder's own classes split {1 - split['test_fraction']:.0%}/"
                      f"{split['test_fraction']:.0%} per class, each file by a hash of its path (adding images "
                      "moves none); each run's data.json lists the test images")
    table = Table("class", "train", "test")
    train_counts = dataset.train.class_counts(dataset.num_classes)
    test_counts = dataset.test.class_counts(dataset.num_classes)
    for i, name in enumerate(dataset.classes):
        table.add_row(f"{i} {name}", str(train_counts[i]), str(test_counts[i]))
    table.add_row("[bold]total", str(len(dataset.train)), str(len(dataset.test)))
    console.print(table)
    mean, std = channel_stats(dataset.train.images)
    console.print("train channel mean (R, G, B): " + ", ".join(f"{m:.4f}" for m in mean))
    console.print("train channel std  (R, G, B): " + ", ".join(f"{s:.4f}" for s in std))
    return 0


def run_download(args) -> int:
    path = download(OFFICIAL[args.name], args.dir or default_data_dir())
    print(f"{args.name}: {path} (MD5 verified)")
    return 0


def run_cache(args) -> int:
    from datetime import datetime

    from cudacnn.data import cache

    cache_dir, data_dir = args.cache_dir or cache.default_cache_dir(), args.dir or default_data_dir()
    entries = cache.list_entries(cache_dir, data_dir)
    console = Console()
    if args.clear:
        removed = cache.clear(entries, args.clear)
        for entry in removed:
            console.print(f"removed {entry.path}")
        console.print(f"freed {sum(e.size for e in removed) / 2**20:,.1f} MiB")
        return 0
    if not entries:
        console.print(f"no cached sources in {cache_dir} or {data_dir}")
        return 0
    table = Table("file", "kind", "source", "MiB", "date", title=f"cached sources ({cache_dir}, {data_dir})")
    for entry in entries:
        table.add_row(entry.path.name, entry.kind, entry.source, f"{entry.size / 2**20:,.1f}",
                      datetime.fromtimestamp(entry.modified).strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    console.print(f"total {sum(e.size for e in entries) / 2**20:,.1f} MiB; "
                  "`cudacnn data cache --clear NAME|all` deletes them")
    return 0
