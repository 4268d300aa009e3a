"""The batch-invariant GEMM behind ``fastdiff.batch_invariant()`` vs the GEMMs a linear layer would otherwise run.

Providers (CPU only: the mode is for CPU generation):
    fastdiff  ``torch.ops.fastdiff.rows_matmul(x, w)``: each element one FMA chain, any batch, thread count or row
    torch     ``F.linear(x, w)`` (MKL / the BLAS torch was built with): the fastest, not batch-invariant
    chunked   the mode's fallback without the extension: ``bmm`` in fixed chunks of CHUNK rows
    compile   ``torch.compile`` of ``F.linear`` (benchmarks/conftest.py)

Shapes (R, K, N): the linear layers of the shipped digits UNet at CFG batch 32 (256 tokens at 16², 64 at 8²) and a
cross-attention key projection. ``extra_info`` holds GFLOP/s at the median. Each provider's answer is checked
against float64 before timing.

Run: ``pytest benchmarks/test_bench_rows_matmul.py --benchmark-group-by=group``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import batch_invariance, native

BATCH = 32
SHAPES = [(32 * 256, 64, 64), (32 * 256, 64, 256), (32 * 64, 128, 128), (32 * 64, 512, 128), (32 * 7, 12, 32)]
PROVIDERS = ["fastdiff", "torch", "chunked", "compile"]


def _linear(x, w):
    return F.linear(x, w)


def _chunked(x, w):
    rows = x.reshape(BATCH, -1, x.shape[1])  # (batch, tokens, K): the mode chunks along the batch
    y = batch_invariance._chunked(torch.bmm, (rows,), (w.t().unsqueeze(0).expand(batch_invariance.CHUNK, -1, -1),))
    return y.reshape(x.shape[0], w.shape[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the batch-invariant GEMM is a CPU kernel")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-K{}-N{}".format(*s))
def test_bench_rows_matmul(benchmark, compiled, warm_up, shape, provider):
    if not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    r, k, n = shape
    x, w = torch.randn(r, k), torch.randn(n, k)
    fn = {
        "fastdiff": lambda: torch.ops.fastdiff.rows_matmul(x, w),
        "torch": lambda: _linear(x, w),
        "chunked": lambda: _chunked(x, w),
        "compile": (lambda f: (lambda: f(x, w)))(compiled("rows_matmul", _linear) if provider == "compile" else None),
    }[provider]
    out = warm_up(provider, fn)
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4 * k ** 0.5)

    benchmark.group = f"rows_matmul R={r} K={k} N={n} fp32 cpu"
    flops = 2 * r * k * n
    benchmark.extra_info.update(provider=provider, R=r, K=k, N=n, flops=flops, threads=torch.get_num_threads())
    if provider == "compile":
        benchmark.extra_info["compile"] = compiled.mode
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gflops"] = flops / stats.stats.median / 1e9
