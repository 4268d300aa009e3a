"""tests/interpreter_bounds.py, the interpreter's bounds checker (installed by conftest.py): it must catch a load
and a store one element past the tensor, and pass the same kernel when the mask keeps it inside."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks Triton's interpreter")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X, Y, N, LIMIT, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < LIMIT, other=0.0), mask=offs < N)

    return copy_kernel


def test_in_bounds_launch_passes():
    copy_kernel = _kernels()
    x, y = torch.randn(10), torch.zeros(10)
    copy_kernel[(1,)](x, y, 10, 10, BLOCK=16)
    assert torch.equal(x, y)


@pytest.mark.parametrize("n, limit, what", [(10, 11, "load"), (11, 10, "store")])
def test_one_element_past_the_end_is_caught(n, limit, what):
    import interpreter_bounds

    copy_kernel = _kernels()
    storage = torch.randn(12)
    x, y = storage[:10], torch.zeros(10)  # x's storage has room: only y (10 elements) bounds the store
    if what == "load":
        x = torch.randn(10)  # own storage of 10: element 10 is outside it
    with pytest.raises(Exception, match=f"{what} of 1 element"):
        copy_kernel[(1,)](x, y, n, limit, BLOCK=16)
    assert issubclass(interpreter_bounds.OutOfBounds, AssertionError)
