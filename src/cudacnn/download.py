"""Download a published file (an official CIFAR archive, torchvision's ImageNet weights): stream it to a
temporary file, verify its checksum, then rename it into place. A file already there is verified, not fetched."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cudacnn.atomic import atomic_output
from cudacnn.errors import DataError

CHUNK = 1 << 20
# What a failed transfer raises: from urlopen (URLError wraps a refused or unknown address) and from reading the
# response (a reset, a timeout, a broken TLS or HTTP stream). Not OSError at large: a write that fails (a full
# disk) is about this machine, and atomic_output reports it.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


class DownloadError(DataError):
    """The transfer itself failed (no network, a refused or unknown address), not the file."""


@dataclass(frozen=True)
class Published:
    """A file at a fixed address with a published checksum: an MD5, or (torchvision's scheme) the leading hex
    digits of its SHA-256."""

    name: str
    url: str
    filename: str
    md5: str | None = None
    sha256_prefix: str | None = None
    flag: str = "--data"  # where a user passes the file after downloading it by hand
    folder_env: str = "CUDACNN_DATA_DIR"  # the setting that names the download folder

    def check(self, digests: dict[str, str]) -> str | None:
        """None when the digests match; else what was published, for the message."""
        if self.md5 and digests["md5"] != self.md5:
            return f"MD5 {digests['md5']}, not the published {self.md5}"
        if self.sha256_prefix and not digests["sha256"].startswith(self.sha256_prefix):
            return f"SHA-256 {digests['sha256'][:16]}..., not the published {self.sha256_prefix}..."
        return None


def digests_of(path: Path) -> dict[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def download(archive: Published, folder: Path, url: str | None = None, quiet: bool = False) -> Path:
    """Return the verified file in `folder`, downloading it first if it is not there yet."""
    url = url or archive.url
    target = folder / archive.filename
    if target.exists():
        try:
            digests = digests_of(target)
        except OSError as exc:
            raise DataError(f"{target} cannot be read ({exc.strerror or exc}); fix its permissions, or delete it "
                            "to download it again") from exc
        problem = archive.check(digests)
        if problem is None:
            return target
        raise DataError(f"{target} has {problem}; delete it and run again to download a fresh copy")
    try:
        with atomic_output(target, ".part") as tmp:  # a failed or corrupt transfer leaves nothing behind
            problem = archive.check(fetch(url, tmp, f"downloading {archive.filename}", quiet, archive.flag))
            if problem is not None:
                raise DataError(f"the download of {url} has {problem}; the transfer was corrupted, run again")
    except OSError as exc:  # the folder, not the transfer (fetch reports its own errors)
        raise DataError(f"cannot write to {folder} ({exc}); set {archive.folder_env} to a writable folder") from exc
    return target


def fetch(url: str, path: Path, description: str, quiet: bool, flag: str = "--data") -> dict[str, str]:
    """Stream `url` into `path` with a progress bar; return the MD5 and SHA-256 of what arrived. Only network
    errors become DownloadError; an error writing `path` goes to the caller as it is."""
    def failed(exc: Exception) -> DownloadError:
        return DownloadError(f"could not download {url} ({exc}); check your connection, or download it yourself "
                             f"and pass the file with {flag}")

    md5, sha256 = hashlib.md5(), hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except NETWORK_ERRORS as exc:
        raise failed(exc) from exc
    with response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), disable=quiet, transient=True) as progress:
            task = progress.add_task(description, total=total)
            while True:
                try:
                    block = response.read(CHUNK)
                except NETWORK_ERRORS as exc:
                    raise failed(exc) from exc
                if not block:
                    break
                out.write(block)
                md5.update(block)
                sha256.update(block)
                progress.advance(task, len(block))
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}
