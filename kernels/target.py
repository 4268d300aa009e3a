"""The GPU a launch is sized for: every host function asks here, not torch, whether a launch runs compiled on a
GPU, which compute capability and how many SMs that GPU has.

Normally that is the tensor's own device (``tensor.is_cuda`` and not under Triton's interpreter). Inside
:func:`planning_for` the answer is a named GPU instead, so the AOT compile check (:mod:`fastdiff.kernels.compile_check`)
can ask the project's own host code which launches it would make on an H200 or an A100 while it holds CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read at import, as Triton itself does

MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2³¹ − 1)
INT32_LIMIT = 2**31  # offsets the kernels compute in 32 bits must stay below this

_planned: tuple[int, int] | None = None  # (arch, sm_count), set inside planning_for()


def interpreting() -> bool:
    """True when Triton's interpreter runs every launch (TRITON_INTERPRET=1 when fastdiff's kernels were imported)."""
    return INTERPRET and _planned is None


def compiled_gpu(t: torch.Tensor) -> bool:
    """Is the launch on ``t`` a compiled kernel on a GPU (rather than interpreted)?"""
    return _planned is not None or (t.is_cuda and not INTERPRET)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU that launches on ``t`` run on (only meaningful when compiled_gpu(t))."""
    if _planned is not None:
        return _planned[1]
    return _cuda_sm_count(_index(t))


@functools.cache
def _cuda_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def arch(t: torch.Tensor) -> int | None:
    """Compute capability of the GPU that launches on ``t`` run on, as 10·major + minor (90 for H100/H200, 80 for
    A100); None when the launch is not compiled for a GPU (the interpreter)."""
    if _planned is not None:
        return _planned[0]
    return _cuda_arch(_index(t)) if compiled_gpu(t) else None


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def planning_for(arch: int, sm_count: int) -> Iterator[None]:
    """Within this block, host functions size launches for a compiled GPU of compute capability ``arch`` (e.g. 90)
    with ``sm_count`` SMs, whatever device their tensors are on (the launches themselves are for the caller to
    intercept; see compile_check)."""
    global _planned
    for name, value in (("arch", arch), ("sm_count", sm_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    previous, _planned = _planned, (arch, sm_count)
    try:
        yield
    finally:
        _planned = previous


# ------------------------------------------------------------------------------------------------ traced launches
def _traced_types() -> tuple:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
    except ImportError:  # pragma: no cover - torch without these (older than fastdiff supports)
        return ()
    return (FakeTensor, FunctionalTensor)


_TRACED = _traced_types()


def tracing(t: torch.Tensor) -> bool:
    """True while a host function runs on a fake or functional tensor: torch.compile (AOT autograd, inductor) or
    make_fx is tracing it into a graph. The host code then neither reads pointers nor benchmarks, and launches go
    through :func:`launcher`, so the graph records each Triton kernel for inductor to compile and schedule."""
    return isinstance(t, _TRACED)


def launcher(kernel, t: torch.Tensor):
    """``kernel`` for a launch on ``t``: as is in eager mode; wrapped with ``torch.library.wrap_triton`` while
    :func:`tracing`, so the launch becomes a node of the traced graph instead of running."""
    if tracing(t):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def register_cap(t: torch.Tensor, maxnreg: int) -> dict:
    """``{"maxnreg": maxnreg}`` for an eager launch on ``t``. A traced launch gets none: inductor's wrapper for
    user-defined kernels takes only the usual launch options (num_warps, num_stages) and would treat maxnreg as an
    argument of the kernel; without the cap the Triton 3.6 build of a few step variants spills 4 B (docs/kernels.md)."""
    return {} if tracing(t) else {"maxnreg": maxnreg}
