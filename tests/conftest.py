import contextlib
import functools
import os

import numpy as np
import pytest

import cpuattn
from cpuattn import _native

ISAS = list(_native._core.supported_isas()) if _native.available() else []
BACKENDS = ["numpy"] + [f"native-{isa}" for isa in ISAS]


def pytest_report_header(config):
    return f"cpuattn {cpuattn.__version__}: {cpuattn.info()}"


@contextlib.contextmanager
def pinned_isa(isa: str):
    """The native kernels of one ISA for the duration, the previous choice restored after."""
    core = _native._core
    previous = core.isa()
    core.select_isa(isa)
    try:
        yield
    finally:
        core.select_isa(previous)


@contextlib.contextmanager
def on_backend(function, name: str):
    """function pinned to one backend (a BACKENDS name), and for native to one ISA's kernels."""
    if name == "numpy":
        yield functools.partial(function, backend="numpy")
        return
    with pinned_isa(name.split("-", 1)[1]):
        yield functools.partial(function, backend="native")


@pytest.fixture(params=BACKENDS)
def attention(request):
    """cpuattn.attention pinned to one backend, and for native to one ISA's kernels."""
    with on_backend(cpuattn.attention, request.param) as pinned:
        yield pinned


@pytest.fixture(params=ISAS or [pytest.param(None, marks=pytest.mark.skip("no native"))])
def native(request):
    """cpuattn.attention on the native backend, pinned to each supported ISA."""
    with pinned_isa(request.param):
        yield functools.partial(cpuattn.attention, backend="native")


@pytest.fixture(params=["numpy-tiny-tiles", "numpy"] + [f"native-{isa}" for isa in ISAS])
def backward(request, monkeypatch):
    """cpuattn.attention_backward pinned to one backend: NumPy with tiles of 3 queries x 4
    keys (small shapes cross tile edges and skip whole tiles) and its default tiles, and
    native on each supported ISA's kernels."""
    name = request.param
    if name.startswith("numpy"):
        if name == "numpy-tiny-tiles":
            from cpuattn import _numpy_backward

            monkeypatch.setattr(_numpy_backward, "BLOCK_Q", 3)
            monkeypatch.setattr(_numpy_backward, "BLOCK_K", 4)
        yield functools.partial(cpuattn.attention_backward, backend="numpy")
        return
    with pinned_isa(name.split("-", 1)[1]):
        yield functools.partial(cpuattn.attention_backward, backend="native")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def native_required() -> bool:
    """CI builds the extension: its absence there is a failure, not a skip."""
    return os.environ.get("CPUATTN_ALLOW_NO_NATIVE", "") != "1"
