"""Shared by every benchmark file, as fixtures: the ``compile`` provider (``torch.compile`` of the eager baseline),
the untimed first call, and the timed call that waits for the device.

On CUDA each shape gets its own static-shape compile (the best code inductor makes for that shape). On the CPU each
baseline is compiled once with dynamic shapes and reused for every shape: inductor's C++ build costs tens of seconds
per graph on a 2-core machine, and a static compile per shape (12 group-norm shapes, 16 sampler-step cases, ...)
alone would take longer than the whole ``pytest benchmarks/`` budget of 10 minutes. ``compiled.mode`` says which
(the benchmarks put it in ``extra_info["compile"]``).
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
_compiled: dict = {}


def _raise_recompile_limit() -> None:
    import torch._dynamo

    # one recompilation per shape on CUDA: make room so no shape silently falls back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


def compile_baseline(key, fn):
    """``torch.compile(fn)`` for the ``compile`` provider, cached under ``key`` (one per baseline function):
    static shapes on CUDA, dynamic shapes on the CPU (see the module docstring)."""
    if key not in _compiled:
        _raise_recompile_limit()
        _compiled[key] = torch.compile(fn, dynamic=not CUDA)
    return _compiled[key]


compile_baseline.mode = "static shapes" if CUDA else "dynamic shapes"


def warm_up(provider: str, fn, *args):
    """The first call of ``fn(*args)``, untimed (it compiles, autotunes, builds, captures). A ``compile`` provider
    that fails here (no compiler toolchain, an inductor bug) skips its test; any other failure fails it."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        if provider == "compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")
        raise


def synchronized(fn):
    """``fn`` followed by ``torch.cuda.synchronize()`` on CUDA: a timed call that includes the device's work."""
    if not CUDA:
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return call


@pytest.fixture
def compiled():
    """:func:`compile_baseline` (``compiled(key, fn)``; ``compiled.mode``)."""
    return compile_baseline


@pytest.fixture(name="warm_up")
def _warm_up_fixture():
    """:func:`warm_up` (``warm_up(provider, fn, *args)``)."""
    return warm_up


@pytest.fixture(name="synchronized")
def _synchronized_fixture():
    """:func:`synchronized` (``synchronized(fn)``)."""
    return synchronized
