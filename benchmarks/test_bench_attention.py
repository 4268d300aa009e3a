"""Attention: fastdiff vs eager PyTorch, SDPA and torch.compile, side by side per shape (pytest-benchmark groups).

Providers:
    fastdiff  ``fastdiff.ops.attention``: the Triton kernel on CUDA (forced, and checked to have run); on CPU the
              reference path (``backend="torch"``), never the Triton interpreter, which is for tests, not speed
    torch     eager softmax(q kᵀ · scale) v with explicit matmuls (the (N, M) scores are materialised)
    sdpa      ``torch.nn.functional.scaled_dot_product_attention``
    compile   ``torch.compile`` of the eager formula (skipped if it fails to compile here)

fp16 on CUDA, fp32 on CPU (N ≤ 1024 there, so the file runs in about a minute). Every timed call synchronises
CUDA. ``extra_info`` holds the shape, the FLOP count 4·B·H·N·M·D, TFLOP/s at the median wall time and, on CUDA,
the device time by CUDA events (``triton.testing.do_bench``, median) with its TFLOP/s: the wall time of a
small call includes the Python launch overhead, the device time does not.

Run: ``pytest benchmarks/test_bench_attention.py`` (add ``--benchmark-group-by=group`` for one table per shape).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from roofline import record as record_roofline

import fastdiff
from fastdiff import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32

# (kind, B, H, N, M, D)
CUDA_SHAPES = [
    ("self", 2, 8, 256, 256, 64),
    ("self", 2, 8, 1024, 1024, 64),
    ("self", 2, 8, 4096, 4096, 64),
    ("self", 2, 8, 256, 256, 40),
    ("self", 2, 8, 1024, 1024, 40),
    ("self", 2, 8, 4096, 4096, 40),
    ("cross", 2, 8, 1024, 77, 64),  # M=77 text tokens
    ("cross", 2, 8, 4096, 77, 64),
]
CPU_SHAPES = [  # N = 4096 left to CUDA: eager attention would materialise 1 GiB of scores per call here
    ("self", 2, 8, 256, 256, 64),
    ("self", 2, 8, 256, 256, 40),
    ("self", 2, 8, 1024, 1024, 64),
    ("self", 2, 8, 1024, 1024, 40),
    ("cross", 2, 8, 1024, 77, 64),
]
SHAPES = CUDA_SHAPES if CUDA else CPU_SHAPES
PROVIDERS = ["fastdiff", "torch", "sdpa", "compile"]
# output vs fp32 SDPA, a sanity check before timing (relative error)
CHECK_TOL = 2e-2 if DTYPE != torch.float32 else 1e-4


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v as a model without fused attention writes it (softmax in fp32)."""
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, M)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, N, D)


def _provider_fn(provider, q, k, v, scale, compiled):
    if provider == "fastdiff":
        backend = "triton" if CUDA else "torch"
        return lambda: ops.attention(q, k, v, scale=scale, backend=backend)
    if provider == "torch":
        return lambda: _eager(q, k, v, scale)
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    if provider == "compile":
        fn = compiled("attention", _eager)
        return lambda: fn(q, k, v, scale)
    raise AssertionError(provider)


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _shape_id(shape):
    return "{}-B{}H{}-N{}-M{}-D{}".format(*shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_bench_attention(benchmark, compiled, warm_up, synchronized, shape, provider):
    kind, b, h, n, m, d = shape
    q = torch.randn(b, h, n, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(b, h, m, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(b, h, m, d, device=DEVICE, dtype=DTYPE)
    scale = d**-0.5
    if provider == "fastdiff" and CUDA and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 would time Triton's interpreter: unset it to time the compiled kernel")
    fn = _provider_fn(provider, q, k, v, scale, compiled)

    # warm up (compiles, autotunes) and check the answer before timing anything
    fastdiff.reset_counts()
    out = warm_up(provider, fn)
    if provider == "fastdiff":
        assert fastdiff.counts() == {("attention", "triton" if CUDA else "torch"): 1}
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    err = _rel_err(out, ref)
    assert err < CHECK_TOL, f"{provider} is wrong: relative error {err:.2e}"

    benchmark.group = f"attention {_shape_id(shape)} {str(DTYPE).removeprefix('torch.')} {DEVICE.type}"
    flops = 4 * b * h * n * m * d
    benchmark.extra_info.update(
        provider=provider, kind=kind, B=b, H=h, N=n, M=m, D=d, dtype=str(DTYPE), device=DEVICE.type, flops=flops,
        rel_err=err,
    )
    if provider == "compile":
        benchmark.extra_info["compile"] = compiled.mode
    itemsize = q.element_size()
    record_roofline(benchmark.extra_info, (2 * b * h * n * d + 2 * b * h * m * d) * itemsize, flops, DTYPE)
    benchmark(synchronized(fn))

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / stats.stats.median / 1e12
    if CUDA:
        import triton.testing

        gpu_ms = triton.testing.do_bench(fn, return_mode="median")
        benchmark.extra_info["gpu_ms"] = gpu_ms
        benchmark.extra_info["gpu_tflops"] = flops / (gpu_ms * 1e-3) / 1e12
