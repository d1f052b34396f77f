"""Shared fixtures. The shared JPEG set lives in ../shared/data beside the checkout; where it is absent (a
user's fresh clone), tests that need real images run on the bundled sample (2,500 of its images) instead,
and under CI=true, where the shared set must be present, its absence fails them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be switched
# on before triton is first imported: set it here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SAMPLE = REPO / "src" / "cudacnn" / "data" / "sample" / "cifar10-sample.tar.gz"


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


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels our ops launch, in order (every launch from Python goes through
    batchnorm._launch; the C++ path is off)."""
    from cudacnn.kernels import batchnorm, planned

    names = []
    launch = batchnorm._launch
    monkeypatch.setattr(planned, "ENABLED", False)  # C++ launches from plans would bypass the count

    def counting(kernel, grid, wrap):
        names.append(kernel.fn.__name__)
        return launch(kernel, grid, wrap)

    monkeypatch.setattr(batchnorm, "_launch", counting)
    return names


@pytest.fixture(params=[True, False], ids=["direct", "through-ops"])
def direct(request, monkeypatch):
    """Each test twice: eager calls through the autograd.Functions that skip the dispatcher (kernels.ops'
    DIRECT_EAGER), then through the registered ops."""
    from cudacnn.kernels import ops

    monkeypatch.setattr(ops, "DIRECT_EAGER", request.param)
    return request.param


@pytest.fixture
def op_calls(monkeypatch):
    """`spy(*names)`: the registered op functions of kernels.ops by those names record each call by name (then
    run) in the list it returns, so a test sees which calls went through the dispatcher."""
    from cudacnn.kernels import ops

    def spy(*names):
        calls = []
        for name in names:
            real = getattr(ops, name)
            monkeypatch.setattr(ops, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
        return calls

    return spy


@pytest.fixture
def run_compiled_triton():
    """Run a Python script in a subprocess with Triton's compiler instead of its interpreter (this checkout's
    package first on the path): what the interpreter lets pass, such as type or layout errors in a kernel,
    shows there. Returns the finished process."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="session")
def shared_jpeg_path() -> Path:
    """The shared CIFAR-10 JPEG set, or on a fresh clone the bundled sample of it (same layout and classes)."""
    path = Path(os.environ.get("CUDACNN_SHARED_JPEG", SHARED_JPEG))
    if path.exists():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{path} is missing; CI must run the tests on the shared data set")
    return SAMPLE


@pytest.fixture(scope="session")
def full_shared_set(shared_jpeg_path) -> bool:
    """Whether the real-image tests run on the full shared set (else on the sample)."""
    return shared_jpeg_path != SAMPLE


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cifar_jpeg(shared_jpeg_path, shared_cache_dir):
    """The shared JPEG set, decoded once per test session."""
    from cudacnn.data import load_dataset

    return load_dataset(shared_jpeg_path, cache_dir=shared_cache_dir, quiet=True)
