"""Shared fixtures. The shared JPEG set lives in ../shared/data beside the checkout: tests that need it
skip when it is absent (a user's fresh clone), but fail when CI=true, so CI always runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be switched
# on before triton is first imported: set it here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def triton_interpreter():
    """Kernel tests on the CPU need Triton's interpreter, which works only if it was on at triton's first
    import (set above): skip otherwise, and fail under CI, where it must always work."""
    if torch.cuda.is_available():
        return
    from cudacnn.kernels import _runtime

    if not _runtime.interpreter_ready():
        reason = "triton was imported before TRITON_INTERPRET=1; run with TRITON_INTERPRET=1 set"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_jpeg_path() -> Path:
    path = Path(os.environ.get("CUDACNN_SHARED_JPEG", SHARED_JPEG))
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must run the tests on the shared data set")
        pytest.skip(f"{path} is absent (only the project's machines have the shared data set)")
    return path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cifar_jpeg(shared_jpeg_path, shared_cache_dir):
    """The shared JPEG set, decoded once per test session."""
    from cudacnn.data import load_dataset

    return load_dataset(shared_jpeg_path, cache_dir=shared_cache_dir, quiet=True)
