"""3×3 convolution (stride 1, padding 1): fastdiff.ops.conv3x3 (Winograd on the CPU) vs torch's own convolution.

The baselines are what a user runs: ``F.conv2d`` on the same channels_last tensor (oneDNN's direct convolution, the
layout the pipelines use and the fastest torch has here), and on the same values in NCHW. ``compile`` is absent on
purpose: inductor lowers a lone convolution to the same oneDNN call. The shapes are the 3×3 convolutions of the two
UNets of benchmarks/test_bench_pipeline.py (digits-ddpm at batch 32 = 16 images with guidance; the 6.5M UNet at
batch 16), fp32 and bf16. ``extra_info["GFLOP/s"]`` is the direct convolution's arithmetic (2·9·N·C·K·H·W) per second
for every provider, so Winograd's fewer multiplications show as a rate above what the direct convolution reaches.
CPU only: on CUDA ``ops.conv3x3`` is ``F.conv2d`` (cuDNN).

    pytest benchmarks/test_bench_conv3x3.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the Winograd path is the CPU's")

SHAPES = [  # (N, C, K, H): digits-ddpm's levels, then the 6.5M UNet's
    (32, 32, 32, 16), (32, 64, 64, 8), (32, 128, 64, 8),
    (16, 64, 64, 32), (16, 128, 128, 16), (16, 256, 128, 16), (16, 128, 128, 8),
]
PROVIDERS = ["fastdiff", "torch", "torch-nchw"]
ROUNDS = 20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-C{}-K{}-{}²".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_conv3x3(benchmark, warm_up, shape, provider, dtype, monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)  # the path users run
    n, c, k, h = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    weight_cl = weight.contiguous(memory_format=torch.channels_last)  # as the pipelines hold their weights
    if provider == "fastdiff":
        def fn():
            return ops.conv3x3(x, weight_cl, bias)
    elif provider == "torch":
        def fn():
            return F.conv2d(x, weight_cl, bias, padding=1)
    else:
        x_nchw = x.contiguous()

        def fn():
            return F.conv2d(x_nchw, weight, bias, padding=1)
    with torch.inference_mode():
        got = warm_up(provider, fn)
        want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), f"{provider}: relative error {err:.2e}"
        benchmark.group = f"conv3x3 N={n} C={c} K={k} {h}x{h} {str(dtype).replace('torch.', '')}"
        benchmark.extra_info.update(provider=provider, dtype=str(dtype), tile=ops.winograd_tile(x.shape, dtype,
                                                                                                weight.shape))
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        flops = 2 * 9 * n * c * k * h * h
        benchmark.extra_info["GFLOP/s"] = round(flops / benchmark.stats.stats.median / 1e9, 1)
