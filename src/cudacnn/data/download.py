"""Download an official archive: stream to a temporary file, verify its checksum, then rename into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

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
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.filename}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise DataError(f"cannot write to {folder} ({exc}); set CUDACNN_DATA_DIR to a writable folder") from exc
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), disable=quiet, transient=True) as progress:
                task = progress.add_task(f"downloading {archive.filename}", total=total)
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    progress.advance(task, len(block))
        if digest.hexdigest() != archive.md5:
            raise DataError(f"the download of {url} has MD5 {digest.hexdigest()}, not the published "
                            f"{archive.md5}; the transfer was corrupted, run again")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(f"could not download {url} ({exc}); check your connection, or download it yourself "
                        f"and pass the file with --data") from exc
    finally:
        tmp.unlink(missing_ok=True)
