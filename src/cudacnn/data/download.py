"""Download an official archive: stream to a temporary file, verify its checksum, then rename into place."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cudacnn.atomic import atomic_output
from cudacnn.data.cifar import OfficialArchive
from cudacnn.errors import DataError

CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(archive: OfficialArchive, folder: Path, url: str | None = None, quiet: bool = False) -> Path:
    """Return the verified archive in `folder`, downloading it first if it is not there yet."""
    url = url or archive.url
    target = folder / archive.filename
    if target.exists():
        if md5_of(target) == archive.md5:
            return target
        raise DataError(f"{target} does not match the published MD5 {archive.md5}; delete it and run again "
                        "to download a fresh copy")
    try:
        with atomic_output(target, ".part") as tmp:  # a failed or corrupt transfer leaves nothing behind
            digest = fetch(url, tmp, f"downloading {archive.filename}", quiet)
            if digest != archive.md5:
                raise DataError(f"the download of {url} has MD5 {digest}, not the published "
                                f"{archive.md5}; the transfer was corrupted, run again")
    except OSError as exc:  # the folder, not the transfer (fetch reports its own errors)
        raise DataError(f"cannot write to {folder} ({exc}); set CUDACNN_DATA_DIR to a writable folder") from exc
    return target


def fetch(url: str, path: Path, description: str, quiet: bool) -> str:
    """Stream `url` into `path` with a progress bar; return the MD5 of what arrived."""
    digest = hashlib.md5()
    try:
        with open(path, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), disable=quiet, transient=True) as progress:
                task = progress.add_task(description, total=total)
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    progress.advance(task, len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(f"could not download {url} ({exc}); check your connection, or download it yourself "
                        f"and pass the file with --data") from exc
    return digest.hexdigest()
