"""VQ nearest-codebook search: fastdiff's native kernel vs what users would otherwise call, side by side per size.

Providers:
    fastdiff  ``fastdiff.ops.vq_nearest(backend="native")``: the C++ kernel on CPU, the CUDA kernel on GPU
              (forced, and checked to have run)
    torch     ``torch.cdist(z, e).argmin(1)`` (materialises the N × K distances)
    compile   ``torch.compile`` of the same expression (benchmarks/conftest.py; skipped if it fails to compile here)
    faiss     ``faiss.IndexFlatL2(D)`` with the codebook added, ``index.search(z, 1)`` (CPU only; skipped when
              faiss-cpu is not installed: ``pip install fastdiff[faiss]``)

Sizes (N, K, D): (16384, 512, 64), (65536, 1024, 64), (16384, 8192, 256), i.e. 1.1, 8.6 and 69 GFLOP of
dot products (2·N·K·D). fp32 on CPU; fp32 and fp16 on CUDA. One pytest-benchmark group per size and dtype;
``extra_info`` holds the shape, the FLOP count and GFLOP/s at the median time. Each provider's answer is checked
against a float64 evaluation on the first rows before timing: fastdiff's must be the nearest code (up to near-ties)
on every dtype, and every provider's in fp32; an fp16 baseline that rounds its distances in fp16 picks another code
on some rows, which is recorded (``extra_info["wrong_rows"]``), not failed. Every timed call synchronises CUDA.

Run: ``pytest benchmarks/test_bench_vq_nearest.py --benchmark-group-by=group``; with ``--benchmark-disable``
every case runs once (the CI's quick pass).
"""

from __future__ import annotations

import pytest
import torch
from roofline import record as record_roofline

import fastdiff
from fastdiff import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]
SIZES = [(16384, 512, 64), (65536, 1024, 64), (16384, 8192, 256)]  # (N, K, D)
PROVIDERS = ["fastdiff", "torch", "compile", "faiss"]
MAX_WRONG = 1e-3  # fraction of checked rows where a pick may be off the float64 nearest code beyond near-ties
CHECK_ROWS = 2048  # rows checked against float64 (the whole N × K float64 table would be 1 GB at the largest size)


def _cdist_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(1)


def _provider_fn(provider: str, z: torch.Tensor, codebook: torch.Tensor, compiled):
    if provider == "fastdiff":
        return lambda: ops.vq_nearest(z, codebook, backend="native")
    if provider == "torch":
        return lambda: _cdist_argmin(z, codebook)
    if provider == "compile":
        fn = compiled("vq_nearest", _cdist_argmin)
        return lambda: fn(z, codebook)
    if provider == "faiss":
        if CUDA:
            pytest.skip("faiss IndexFlatL2 here is the CPU anchor")
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.float().numpy())
        queries = z.float().numpy()
        return lambda: index.search(queries, 1)[1]
    raise AssertionError(provider)


def _indices(out) -> torch.Tensor:
    return torch.as_tensor(out).reshape(-1).to(torch.int64).cpu()


def _wrong_rows(picks: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> float:
    """The fraction of the first CHECK_ROWS rows whose pick is farther than the float64 nearest code by more than a
    near-tie (1e-4 of the row's distance scale, far above fp32 rounding, far below fp16's)."""
    zs, e = z[:CHECK_ROWS].double(), codebook.double()
    dist = (zs * zs).sum(1, keepdim=True) - 2 * zs @ e.T + (e * e).sum(1)
    best = dist.min(1).values
    scale = (zs * zs).sum(1) + (e * e).sum(1).max()
    picked = dist.gather(1, picks[:CHECK_ROWS].to(dist.device).view(-1, 1)).squeeze(1)
    return (picked > best + 1e-4 * scale).double().mean().item()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_bench_vq_nearest(benchmark, compiled, warm_up, synchronized, size, dtype, provider):
    n, k, d = size
    z = torch.randn(n, d, device=DEVICE).to(dtype)
    codebook = torch.randn(k, d, device=DEVICE).to(dtype)
    fn = _provider_fn(provider, z, codebook, compiled)

    # warm up (build, compile) and check the answer before timing anything
    fastdiff.reset_counts()
    out = warm_up(provider, fn)
    if provider == "fastdiff":
        assert fastdiff.counts() == {("vq_nearest", "native"): 1}, fastdiff.counts()
    wrong = _wrong_rows(_indices(out), z, codebook)
    if provider == "fastdiff" or dtype == torch.float32:
        assert wrong <= MAX_WRONG, f"{provider} picks a farther code on {wrong:.2%} of the checked rows"

    benchmark.group = f"vq_nearest N={n} K={k} D={d} {str(dtype).removeprefix('torch.')} {DEVICE.type}"
    flops = 2 * n * k * d
    benchmark.extra_info.update(provider=provider, N=n, K=k, D=d, dtype=str(dtype), device=DEVICE.type, flops=flops,
                                threads=torch.get_num_threads(), wrong_rows=wrong)
    if provider == "compile":
        benchmark.extra_info["compile"] = compiled.mode
    # z and the codebook read once, one int64 index written per row
    record_roofline(benchmark.extra_info, (n * d + k * d) * z.element_size() + 8 * n, flops, dtype)
    benchmark(synchronized(fn))

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = flops / stats.stats.median / 1e9
