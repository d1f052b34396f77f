"""The decoded cache: one uncompressed .npz per source, named and checked by a fingerprint of the source."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cudacnn.atomic import atomic_output
from cudacnn.data.dataset import Dataset, Split
from cudacnn.errors import DataError

FORMAT_VERSION = 2  # 2: images of any size (the fingerprint names the size and resize policy), `info` in meta
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CUDACNN_CACHE") or Path.home() / ".cache" / "cudacnn")


def fingerprint(path: Path, decoding: str = "") -> str:
    """Changes when the source's files change (path, size, modification time of every file) or when `decoding`
    (the image size, resize policy and split rule the arrays are made with) does."""
    path = path.resolve()
    entries = [f"v{FORMAT_VERSION}", str(path), decoding]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        entries.append(f"{file.relative_to(path) if path.is_dir() else ''}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cache_path(cache_dir: Path, source: Path, print_: str, image_size: int = 32) -> Path:
    """<name>-<hash of its location>-s<image size>-<fingerprint>.npz: one live cache per source location and
    image size (saving one drops the older caches of the same location and size only)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:60]
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return cache_dir / f"{slug}-{where}-s{image_size}-{print_[:16]}.npz"


def load(path: Path, print_: str) -> Dataset | None:
    """The cached dataset, or None when there is none; a corrupt or stale file is dropped with a warning."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("fingerprint") != print_:
                raise ValueError("fingerprint does not match the source")
            dataset = Dataset(meta["name"], meta["classes"], Split(f["train_x"], f["train_y"]),
                              Split(f["test_x"], f["test_y"]), source=meta["source"], cache_path=path,
                              info=meta.get("info", {}))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        log.warning("warning: cache %s is unreadable (%s); rebuilding it", path, exc)
        _remove(path)
        return None
    return dataset


def _remove(path: Path) -> None:
    """Delete a cache file if the folder allows; where it does not, writing the new cache says so."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("warning: could not delete the cache %s (%s)", path, exc.strerror or exc)


def save(dataset: Dataset, path: Path, print_: str) -> Path:
    """Write atomically: a temporary file in the same folder, renamed over the target when complete."""
    meta = json.dumps({"fingerprint": print_, "name": dataset.name, "classes": dataset.classes,
                       "source": dataset.source, "version": FORMAT_VERSION, "info": dataset.info})
    writing = False
    try:
        with atomic_output(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
            writing = True
            np.savez(tmp, meta=np.array(meta), train_x=dataset.train.images, train_y=dataset.train.labels,
                     test_x=dataset.test.images, test_y=dataset.test.labels)
    except OSError as exc:
        if writing:
            raise DataError(f"could not write the cache {path} ({exc.strerror or exc}); free disk space, or pass "
                            "--cache-dir a folder you can write to") from exc
        raise DataError(f"cache directory {path.parent} is not writable ({exc.strerror or exc}); "
                        "pass --cache-dir or set CUDACNN_CACHE to a writable folder") from exc
    # Drop the caches of earlier versions of the same source.
    for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npz"):
        if stale != path:
            _remove(stale)
    dataset.cache_path = path
    return path


# -- `cudacnn data cache`: what the caches hold, and clearing them

@dataclass
class CacheEntry:
    kind: str      # "decoded" (a .npz written here) or "download" (an official archive)
    path: Path
    source: str    # what it was made from: the source path, or the official name and URL
    size: int      # bytes
    modified: float  # st_mtime

    def names(self) -> set[str]:
        """What `--clear NAME` matches: the file name, the source path or its file name, an official name, and
        `sample` for the decoded caches of the bundled sample (the sample itself is package data, never cleared)."""
        from cudacnn.data.cifar import OFFICIAL
        from cudacnn.data.sources import SAMPLE, sample_path

        names = {self.path.name, self.source, Path(self.source).name}
        names |= {key for key, archive in OFFICIAL.items() if archive.filename in names}
        if self.kind == "decoded" and self.source == str(sample_path()):
            names.add(SAMPLE)
        return names


def list_entries(cache_dir: Path, data_dir: Path) -> list[CacheEntry]:
    """Decoded caches in `cache_dir` and downloaded official archives in `data_dir`, newest first."""
    from cudacnn.data.cifar import OFFICIAL

    entries = []
    for path in sorted(cache_dir.glob("*.npz")) if cache_dir.is_dir() else []:
        try:
            with np.load(path, allow_pickle=False) as f:
                source = str(json.loads(str(f["meta"]))["source"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError):
            source = "(unreadable: rebuilt on next use)"
        stat = path.stat()
        entries.append(CacheEntry("decoded", path, source, stat.st_size, stat.st_mtime))
    for key, archive in OFFICIAL.items():
        path = data_dir / archive.filename
        if path.is_file():
            stat = path.stat()
            entries.append(CacheEntry("download", path, f"{key} ({archive.url})", stat.st_size, stat.st_mtime))
    return sorted(entries, key=lambda e: -e.modified)


def clear(entries: list[CacheEntry], name: str) -> list[CacheEntry]:
    """Delete the entries `name` matches (`all`: every one); return them. DataError when none matches."""
    chosen = entries if name == "all" else [e for e in entries if name in e.names()]
    if not chosen:
        known = sorted({e.path.name for e in entries})
        raise DataError(f"no cached source matches {name!r}; "
                        + (f"pass one of {', '.join(known)} or 'all'" if known else "the cache is empty"))
    for entry in chosen:
        try:
            entry.path.unlink(missing_ok=True)
        except OSError as exc:
            raise DataError(f"could not delete {entry.path} ({exc.strerror or exc}); check its folder's "
                            "permissions") from exc
    return chosen
