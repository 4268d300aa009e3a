"""Shared by every benchmark file: the ``compile`` provider (``torch.compile`` of the eager baseline).

On CUDA each shape gets its own static-shape compile (the best code inductor makes for that shape). On the CPU each
baseline is compiled once with dynamic shapes and reused for every shape: inductor's C++ build costs tens of seconds
per graph on a 2-core machine, and a static compile per shape (12 group-norm shapes, 16 sampler-step cases, ...)
alone would take longer than the whole ``pytest benchmarks/`` budget of 10 minutes. ``extra_info["compile"]`` says
which one a result used.
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
    static shapes on CUDA, dynamic shapes on the CPU (see the module docstring). Returns (compiled fn, mode)."""
    if key not in _compiled:
        _raise_recompile_limit()
        dynamic = not CUDA
        _compiled[key] = (torch.compile(fn, dynamic=dynamic), "dynamic shapes" if dynamic else "static shapes")
    return _compiled[key]


@pytest.fixture
def compiled():
    """The :func:`compile_baseline` helper, as a fixture for the benchmark files."""
    return compile_baseline
