"""A uniform view of an archive or a folder: relative file paths -> bytes."""

from __future__ import annotations

import lzma
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Mapping

from cudacnn.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_tar_path(path: Path) -> bool:
    return path.name.endswith(TAR_SUFFIXES)


class FileReader:
    """A folder's file: called, its bytes; `path` lets a worker process read it itself."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self) -> bytes:
        return self.path.read_bytes()


def read_tree(path: Path) -> Mapping[str, Callable[[], bytes]]:
    """Map each regular file's relative POSIX path to a function that returns its bytes."""
    if path.is_dir():
        files = {}
        for file in sorted(path.rglob("*")):
            if file.is_file():
                files[file.relative_to(path).as_posix()] = FileReader(file)
        return files
    if path.is_file() and is_tar_path(path):
        return _read_tar(path)
    if path.is_file():
        raise DataError(f"{path} is not a folder or a tar archive ({', '.join(TAR_SUFFIXES)}); "
                        "point --data at a CIFAR archive, an extracted CIFAR folder or an image-folder tree")
    raise DataError(f"{path} does not exist; check the path given to --data (or CUDACNN_DATA)")


def _read_tar(path: Path) -> dict[str, Callable[[], bytes]]:
    # One sequential pass: a gzip stream is slow to seek, and CIFAR archives fit in memory.
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                if len(data) != member.size:
                    raise EOFError(f"{member.name} ends early")
                contents[member.name.removeprefix("./")] = data
            # read past the tar end marker to the end of the stream: only there do gzip/bz2/xz check their CRC
            # (a flipped bit inside the data, or a cut-off trailer, is otherwise accepted as different pixels)
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:  # bz2's errors are OSErrors
        raise DataError(f"{path} is truncated or corrupt ({exc}); download or copy it again") from exc
    if not contents:
        raise DataError(f"{path} holds no files; download or copy it again")
    return {name: (lambda data=data: data) for name, data in contents.items()}
