"""The Triton kernels across Triton versions: this machine has Triton 3.9, the GPU machine's image 3.6.

Triton 3.6's interpreter converts loop bounds with ``int(array)``, which NumPy ≥ 2.3 refuses for its 1-element
arrays; ``fastdiff.kernels`` patches that once for the interpreter (see ``kernels/__init__.py``).

What this test can catch depends on the Triton it runs under. Under Triton ≥ 3.7 (3.9 in this venv) the
interpreter squeezes the bound itself, so the kernel below runs correctly with or without the patch: the test
cannot fail on the patch's account there, and only checks that the patch was installed and does no harm. It is a
real check only under Triton 3.6, where without the patch the first runtime-bounded loop raises
``InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python scalars')``. To run it so: a
separate venv with ``triton==3.6.0`` and torch (one may exist at ``/tmp/t36``), then ``TRITON_INTERPRET=1
PYTHONPATH=. /tmp/t36/bin/python -m pytest tests/test_triton_versions.py`` — with the kernel tests
(``tests/test_attention.py tests/test_group_norm_silu.py tests/test_ddim_step.py tests/test_ddpm_step.py``) for the
whole picture (2026-12-04: 653 passed with NumPy 2.4.6; without the patch every kernel with a runtime loop bound
failed).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks Triton's interpreter")


def test_loops_with_runtime_bounds_run_in_the_interpreter():
    import triton.language as tl
    from triton.runtime import interpreter

    import fastdiff.kernels  # noqa: F401  (applies the compatibility patch)

    assert getattr(interpreter._patch_lang_tensor, "_fastdiff_compat", False)

    @triton.jit
    def count_tiles(OUT, M, BLOCK: tl.constexpr):
        n = 0.0
        m_full = (M // BLOCK) * BLOCK  # a bound computed from a scalar argument, as in the attention kernel
        for _ in range(0, m_full, BLOCK):
            n += 1.0
        for _ in range(tl.program_id(0), M, BLOCK):
            n += 100.0
        tl.store(OUT, n)

    out = torch.zeros(1)
    for m, want in ((37, 4 + 100 * 5), (8, 1 + 100), (3, 0 + 100)):
        count_tiles[(1,)](out, m, BLOCK=8)
        assert out.item() == want, (m, out.item())
