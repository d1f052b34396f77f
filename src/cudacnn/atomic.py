"""Atomic outputs: files (checkpoints, metrics, reports, plots, ONNX) appear whole or not at all."""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cudacnn.errors import DiskFullError

# a full disk and a full quota: the user frees space and carries on
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

@functools.cache
def _umask() -> int:
    """The process's umask, read once, when the first output is written (not at import)."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block succeeds it is renamed over `path`,
    otherwise removed, so a reader never sees half a file. `suffix` is for writers that go by extension.
    A full disk raises DiskFullError naming `path` (the file as it was before stays)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise DiskFullError(path) from exc
        raise _about(path, exc) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the mode open() would
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise DiskFullError(path) from exc
        if exc.filename != name:
            raise
        raise _about(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _about(path: Path, exc: OSError) -> OSError:
    """The same error about `path`: the temporary file's name would mean nothing to the user."""
    return OSError(exc.errno, exc.strerror, str(path))  # errno picks the subclass (PermissionError, ...)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
