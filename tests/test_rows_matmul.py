"""torch.ops.fastdiff.rows_matmul, the batch-invariant CPU GEMM behind fastdiff.batch_invariant().

The contract (csrc/rows_matmul.h): y[r, n] is one chain of fused multiply-adds over k in increasing order, from +0.
Checked against an exact emulation of that chain (Python fractions, correctly rounded to float32) on a small case,
against float64 on odd shapes, and for the property the mode needs: a row's bits depend on nothing but that row —
not the other rows, their number, the row's position, the thread count, or the micro-kernel (FASTDIFF_CPU_ISA).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from fastdiff import native

CPU_ISAS = ["auto", "avx512", "avx2", "generic"]
SHAPES = [  # (R, K, N)
    (7, 12, 32),  # the cross-attention product that first broke batch invariance
    (1, 1, 1),
    (97, 33, 31),  # nothing a multiple of a block (MR 12/6/4, NR 32, 96-row blocks)
    (300, 64, 70),
    (13, 700, 65),  # long chains
    (200, 5, 1),  # N = 1
]

pytestmark = pytest.mark.skipif(not native.has_rows_matmul(), reason=f"native extension: {native.status()}")


def rows_matmul(x, w):
    return torch.ops.fastdiff.rows_matmul(x, w)


def _round_f32(value: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even): no double rounding through float64."""
    f = np.float32(float(value))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - value), int(np.float32(c).view(np.int32)) & 1))
    return np.float32(best)


def _fma_chain(x_row: np.ndarray, w_row: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for a, b in zip(x_row, w_row):
        acc = _round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(acc)))
    return acc


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_each_element_is_one_fma_chain_in_k_order(isa, monkeypatch):
    if isa != "auto":
        monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 19, generator=g), torch.randn(7, 19, generator=g)
    x[1, 3] = 1e-30  # planted: tiny and huge terms, where the order and the fusion show
    w[2, 4] = 3e7
    got = rows_matmul(x, w).numpy()
    want = np.array([[_fma_chain(x[r].numpy(), w[n].numpy()) for n in range(7)] for r in range(5)], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape):
    r, k, n = shape
    g = torch.Generator().manual_seed(r * 7 + k)
    x, w = torch.randn(r, k, generator=g), torch.randn(n, k, generator=g)
    got = rows_matmul(x, w)
    exact = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()  # the error bound of a length-k float32 sum scales with this
    assert got.shape == (r, n) and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - exact).abs() <= k * 2 ** -23 * scale + 1e-30).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_row_depends_on_nothing_else(shape, monkeypatch):
    r, k, n = shape
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(r, k, generator=g), torch.randn(n, k, generator=g)
    base = rows_matmul(x, w)
    before = torch.get_num_threads()
    try:
        for isa in CPU_ISAS:
            if isa != "auto":
                monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.equal(rows_matmul(x, w), base), (isa, threads)
            monkeypatch.delenv("FASTDIFF_CPU_ISA", raising=False)
    finally:
        torch.set_num_threads(before)
    for i in sorted({0, r // 2, r - 1}):
        assert torch.equal(rows_matmul(x[i:i + 1], w), base[i:i + 1])  # alone
        shifted = torch.cat([torch.randn(3, k, generator=g), x[i:i + 1], torch.randn(2, k, generator=g)])
        assert torch.equal(rows_matmul(shifted, w)[3], base[i])  # at another position, other neighbours
        unaligned = torch.empty(1 + k, dtype=torch.float32)[1:].view(1, k)  # 4-byte-offset storage
        unaligned.copy_(x[i:i + 1])
        assert torch.equal(rows_matmul(unaligned, w), base[i:i + 1])


def test_strided_inputs_and_empty_sizes():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(40, 30, generator=g), torch.randn(30, 50, generator=g).t()  # w: (50, 30), transposed strides
    assert torch.equal(rows_matmul(x.t().contiguous().t(), w), rows_matmul(x, w.contiguous()))
    assert torch.equal(rows_matmul(x[::2], w), rows_matmul(x, w)[::2])
    assert rows_matmul(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)
    assert rows_matmul(torch.randn(2, 4), torch.randn(0, 4)).shape == (2, 0)
    assert torch.equal(rows_matmul(torch.randn(2, 0), torch.randn(3, 0)), torch.zeros(2, 3))
    y = rows_matmul(torch.tensor([[float("nan"), 1.0], [float("inf"), 0.5]]), torch.tensor([[1.0, 1.0]]))
    assert y[0, 0].isnan() and y[1, 0] == float("inf")


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="float32"):
        rows_matmul(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be 2-D"):
        rows_matmul(torch.randn(2, 3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        rows_matmul(torch.randn(2, 3), torch.randn(3))
    with pytest.raises(ValueError, match="share K"):
        rows_matmul(torch.randn(2, 3), torch.randn(4, 5))


@pytest.mark.parametrize("shape", [(7, 12, 32), (97, 33, 31), (0, 4, 3), (2, 4, 0), (2, 0, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_opcheck(shape):
    """Schema, fake (meta) implementation and FakeTensor / AOT-autograd dispatch (torch.library.opcheck)."""
    r, k, n = shape
    g = torch.Generator().manual_seed(3)
    torch.library.opcheck(torch.ops.fastdiff.rows_matmul.default,
                          (torch.randn(r, k, generator=g), torch.randn(n, k, generator=g)))


def test_fake_implementation_gives_shapes_and_the_op_checks():
    """The fake implementation on the meta device and under torch.compile(fullgraph=True): shapes, dtype, and the
    C++ kernel's checks with its exception types."""
    y = rows_matmul(torch.empty(300, 64, device="meta"), torch.empty(70, 64, device="meta"))
    assert y.shape == (300, 70) and y.dtype == torch.float32 and y.device.type == "meta" and y.is_contiguous()
    with pytest.raises(ValueError, match="x must be 2-D"):
        rows_matmul(torch.empty(2, 3, 4, device="meta"), torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match="share K"):
        rows_matmul(torch.empty(2, 3, device="meta"), torch.empty(4, 5, device="meta"))
    with pytest.raises(TypeError, match="float32"):
        rows_matmul(torch.empty(2, 3, device="meta", dtype=torch.float64), torch.empty(4, 3, device="meta"))

    torch._dynamo.reset()
    x, w = torch.randn(9, 5), torch.randn(6, 5)
    compiled = torch.compile(lambda a, b: rows_matmul(a, b) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w), rows_matmul(x, w) * 2)
