"""Benchmarks of fastdiff.ops.ddim_step / ddpm_step, with and without classifier-free guidance (pytest-benchmark).

Providers, side by side in one group per (op, shape):
- ``fastdiff``: the default dispatch: the fused Triton kernel on CUDA, the reference PyTorch path on CPU (the
  interpreter is never benchmarked);
- ``torch``: the update written plainly in eager PyTorch; with CFG, the eager guidance combine followed by the eager
  step (what a diffusers pipeline does);
- ``compile``: ``torch.compile`` of the eager version (skipped if compiling fails; on the CPU one dynamic-shape
  compile per op, reused for every shape: see benchmarks/conftest.py);
- ``copy``: a device-to-device copy moving the same number of bytes: the bandwidth anchor.

``benchmark.extra_info`` holds the bytes one step must move (each input read once, each output written once) and the
achieved GB/s. fp16 on CUDA, fp32 on CPU. CUDA is synchronised inside the timed function.

    pytest benchmarks/test_bench_ddim_ddpm_step.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
from roofline import record as record_roofline

from fastdiff import ops

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
BACKEND = None if CUDA else "torch"  # default dispatch on CUDA; on CPU the reference, never the interpreter
SHAPES = [
    (8, 4, 64, 64),  # SD latents, 512²
    (16, 4, 32, 32),  # latents, 256²
    (16, 3, 32, 32),  # pixel space, CIFAR-sized
    (16, 1, 16, 16),  # pixel space, the digits model
]
if CUDA:
    SHAPES.append((64, 4, 256, 256))  # large enough (~200 MB a step) to measure bandwidth rather than launch latency
OPS = ["ddim_step", "ddpm_step", "ddim_step+cfg", "ddpm_step+cfg"]
PROVIDERS = ["fastdiff", "torch", "compile", "copy"]
ALPHA_T, ALPHA_PREV, GUIDANCE_SCALE = 0.3, 0.45, 7.5
ROUNDS = {"rounds": 50, "iterations": 5, "warmup_rounds": 5}
if not CUDA:
    ROUNDS = {"rounds": 20, "iterations": 2, "warmup_rounds": 2}


# --------------------------------------------------------------------------------------------- the eager baselines
def eager_ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_prev):
    """DDIM, η = 0, ε-prediction, as a diffusers scheduler writes it."""
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    return prev_sample, pred_original_sample


def eager_ddpm_step(sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise):
    """DDPM ancestral step, ε-prediction, fixed_small variance, as a diffusers scheduler writes it."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    x0_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
    xt_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    prev_sample = x0_coeff * pred_original_sample + xt_coeff * sample
    variance = max(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
    prev_sample = prev_sample + variance**0.5 * noise
    return prev_sample, pred_original_sample


def eager_guidance(model_output, guidance_scale):
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def eager(op: str):
    """The eager function for an op name, taking the same tensors as the fastdiff call."""
    if op == "ddim_step":
        return lambda x, m, z: eager_ddim_step(x, m, ALPHA_T, ALPHA_PREV)
    if op == "ddpm_step":
        return lambda x, m, z: eager_ddpm_step(x, m, ALPHA_T, ALPHA_PREV, z)
    if op == "ddim_step+cfg":
        return lambda x, m, z: eager_ddim_step(x, eager_guidance(m, GUIDANCE_SCALE), ALPHA_T, ALPHA_PREV)
    return lambda x, m, z: eager_ddpm_step(x, eager_guidance(m, GUIDANCE_SCALE), ALPHA_T, ALPHA_PREV, z)


def fused(op: str):
    guidance = GUIDANCE_SCALE if op.endswith("+cfg") else None
    if op.startswith("ddim"):
        return lambda x, m, z: ops.ddim_step(x, m, ALPHA_T, ALPHA_PREV, guidance_scale=guidance, backend=BACKEND)
    return lambda x, m, z: ops.ddpm_step(x, m, ALPHA_T, ALPHA_PREV, noise=z, guidance_scale=guidance,
                                         backend=BACKEND)


def step_bytes(op: str, numel: int, itemsize: int) -> int:
    """Bytes one fused step moves: x_t, the model output (twice with CFG), the noise (DDPM) read; 2 outputs written."""
    reads = 1 + (2 if op.endswith("+cfg") else 1) + (1 if op.startswith("ddpm") else 0)
    return (reads + 2) * numel * itemsize


# --------------------------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_ddim_ddpm_step(benchmark, compiled, warm_up, synchronized, shape, op, provider):
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(DTYPE).removeprefix('torch.')}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)
    m = torch.randn((2 * shape[0] if op.endswith("+cfg") else shape[0], *shape[1:]), generator=g, device=DEVICE,
                    dtype=DTYPE)
    z = torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)
    nbytes = step_bytes(op, x.numel(), x.element_size())

    if provider == "fastdiff":
        fn = fused(op)
    elif provider == "torch":
        fn = eager(op)
    elif provider == "compile":
        fn = compiled(op, eager(op))
        benchmark.extra_info["compile"] = compiled.mode
    else:  # copy: the same number of bytes read + written, as one device-to-device copy
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn = lambda x, m, z: dst.copy_(src)

    warm_up(provider, fn, x, m, z)
    benchmark.pedantic(synchronized(fn), args=(x, m, z), **ROUNDS)
    benchmark.extra_info.update(bytes=nbytes, device=str(DEVICE), dtype=str(DTYPE))
    record_roofline(benchmark.extra_info, nbytes, 0, DTYPE)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing was timed
        return
    benchmark.extra_info["gb_per_s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)
    if CUDA:  # the device-side time too (CUDA events, no host sync per call): the number to hold against the copy
        import triton.testing

        device_ms = triton.testing.do_bench(lambda: fn(x, m, z), return_mode="median")
        benchmark.extra_info.update(device_us=round(device_ms * 1e3, 2),
                                    device_gb_per_s=round(nbytes / (device_ms * 1e-3) / 1e9, 2))


def test_eager_baselines_match_fastdiff():
    """The eager baselines compute what the fused op computes (so the comparison is fair)."""
    shape = (2, 4, 8, 8)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x, z = (torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(2))
    m = torch.randn((4, *shape[1:]), generator=g, device=DEVICE, dtype=DTYPE)
    tol = 5e-3 if DTYPE == torch.float16 else 1e-5  # eager fp16 rounds after every op
    for op in OPS:
        mo = m if op.endswith("+cfg") else m[:2]
        for got, want in zip(fused(op)(x, mo, z), eager(op)(x, mo, z), strict=True):
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err <= tol, f"{op}: fused vs eager relative error {err:.2e}"
