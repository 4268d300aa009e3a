"""The GPU a launch is sized for: every host function asks here, not torch, whether a launch runs compiled on a
GPU and how many SMs that GPU has.

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

_planned_sm_count: int | None = None  # set inside planning_for()


def interpreting() -> bool:
    """True when Triton's interpreter runs every launch (TRITON_INTERPRET=1 when fastdiff's kernels were imported)."""
    return INTERPRET and _planned_sm_count is None


def compiled_gpu(t: torch.Tensor) -> bool:
    """Is the launch on ``t`` a compiled kernel on a GPU (rather than interpreted)?"""
    return _planned_sm_count is not None or (t.is_cuda and not INTERPRET)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU that launches on ``t`` run on (only meaningful when compiled_gpu(t))."""
    if _planned_sm_count is not None:
        return _planned_sm_count
    return _cuda_sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def planning_for(sm_count: int) -> Iterator[None]:
    """Within this block, host functions size launches for a compiled GPU with ``sm_count`` SMs, whatever device
    their tensors are on (the launches themselves are for the caller to intercept; see compile_check)."""
    global _planned_sm_count
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    previous, _planned_sm_count = _planned_sm_count, sm_count
    try:
        yield
    finally:
        _planned_sm_count = previous
