"""GroupNorm + SiLU: fastdiff.ops.group_norm_silu vs eager PyTorch (F.group_norm then F.silu) and torch.compile of it.

One pytest-benchmark group per shape, a ``provider`` axis, and GB/s in ``extra_info`` (bytes moved: x read twice,
y written once; the fused kernel may read x only once, so its GB/s is an effective rate comparable across
providers). The ``copy`` anchor (x.clone(): one read, one write, counted as such) is the hardware limit the
kernel's GB/s is measured against (target on an H200: fastdiff ≥ 80% of copy, ≥ 2× torch). On CUDA: fp16, the
compiled Triton kernel, ``CALLS_PER_ROUND`` calls then one synchronize per timed round
(so the launch-to-sync latency does not swamp microsecond kernels; time per call is in extra_info). On CPU: fp32
contiguous, fp32 channels_last and bf16 channels_last (what the pipelines run there), ``fastdiff`` is the default
dispatch there, the native C++ kernel where the extension is built (the Triton interpreter is excluded: it is a
correctness tool, not a CPU path), the baselines run on the same tensor (same dtype and layout), and ``compile`` is
one dynamic-shape compile reused for every shape (see benchmarks/conftest.py).

    pytest benchmarks/test_bench_group_norm_silu.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from roofline import record as record_roofline

from fastdiff import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (dtype, memory format) cases: the GPU's fp16; on the CPU fp32 and the channels_last bf16/fp32 the pipelines use
CASES = [(torch.float16, "nchw")] if CUDA else [(torch.float32, "nchw"), (torch.float32, "channels_last"),
                                                (torch.bfloat16, "channels_last")]
NUM_GROUPS = 32
CALLS_PER_ROUND = 20 if CUDA else 1
ROUNDS = 50 if CUDA else 10

SHAPES = [(n, c, s, s) for s in (32, 16) for c in (128, 256, 512) for n in (1, 8)]  # (N, C, H, W)
if CUDA:
    SHAPES += [(1, 1280, 64, 64), (8, 1280, 64, 64)]  # SD-UNet's widest level at 64² latents
PROVIDERS = ["fastdiff", "torch", "compile", "copy"]


def _eager(x, num_groups, weight, bias, eps):
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _fastdiff(x, num_groups, weight, bias, eps):
    # CUDA: the compiled Triton kernel; CPU: the path users run (native where built; never the interpreter)
    return ops.group_norm_silu(x, num_groups, weight, bias, eps, backend="triton" if CUDA else None)


def _provider_fn(provider: str, compiled):
    if provider == "fastdiff":
        return _fastdiff
    if provider == "torch":
        return _eager
    if provider == "copy":
        return lambda x, *args: x.clone()
    return compiled("group_norm_silu", _eager)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0]).replace('torch.', '')}-{c[1]}")
def test_bench_group_norm_silu(benchmark, compiled, warm_up, synchronized, shape, provider, case, monkeypatch):
    dtype, layout = case
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU path, not the interpreter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    weight = (1 + 0.1 * torch.randn(c, generator=g)).to(device=DEVICE, dtype=dtype)
    bias = (0.1 * torch.randn(c, generator=g)).to(device=DEVICE, dtype=dtype)
    fn = _provider_fn(provider, compiled)
    expected = _eager(x.float(), NUM_GROUPS, weight.float(), bias.float(), 1e-5)
    got = warm_up(provider, fn, x, NUM_GROUPS, weight, bias, 1e-5)
    if provider != "copy":
        err = ((got.float() - expected).norm() / expected.norm()).item()
        assert err < 5e-3, f"{provider} disagrees with eager fp32: relative error {err:.2e}"

    @synchronized
    def run():
        for _ in range(CALLS_PER_ROUND):
            y = fn(x, NUM_GROUPS, weight, bias, 1e-5)
        return y

    where = "" if layout == "nchw" else f" {layout}"
    benchmark.group = f"group_norm_silu N={shape[0]} C={c} {shape[2]}x{shape[3]} G={NUM_GROUPS} {dtype}{where}"
    benchmark.extra_info.update(provider=provider, device=DEVICE, dtype=str(dtype), layout=layout,
                                calls_per_round=CALLS_PER_ROUND)
    if provider == "compile":
        benchmark.extra_info["compile"] = compiled.mode
    # the least any GroupNorm moves: x read once, y written once, weight and bias read
    record_roofline(benchmark.extra_info, (2 * x.numel() + 2 * c) * x.element_size(), 0, dtype)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        per_call = benchmark.stats.stats.median / CALLS_PER_ROUND
        moved = (2 if provider == "copy" else 3) * x.numel() * x.element_size()  # (reads + writes) of x-sized tensors
        benchmark.extra_info["us_per_call"] = round(per_call * 1e6, 2)
        benchmark.extra_info["GB/s"] = round(moved / per_call / 1e9, 2)
