"""Benchmarks of one scheduler step() with classifier-free guidance, fastdiff's scheduler against diffusers' class of
the same name (pytest-benchmark), mid-schedule (history filled) at a Stable Diffusion latent shape.

Providers, side by side in one group per (scheduler, shape):
- ``fastdiff``: ``step(model_output=[uncond; cond], guidance_scale=s)``: one ``fastdiff.ops.linear_step`` (the fused
  Triton kernel on CUDA, its torch reference on the CPU);
- ``diffusers``: what a diffusers pipeline does: the guidance combine in eager PyTorch, then diffusers' ``step()``
  (skipped where diffusers is not installed);
- ``copy``: a device-to-device copy moving the bytes the fused step must move: the bandwidth anchor.

``benchmark.extra_info`` holds those bytes (x, both halves of the model output and the stored history read once,
the outputs written once) and the achieved GB/s. fp16 on CUDA, fp32 on the CPU.

    pytest benchmarks/test_bench_scheduler_step.py --benchmark-group-by=group
"""

from __future__ import annotations

import inspect

import pytest
import torch
from roofline import record as record_roofline

import fastdiff.schedulers as fs

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
SHAPES = [(8, 4, 64, 64)]  # SD latents, 512², a batch of 8
if CUDA:
    SHAPES.append((32, 4, 128, 128))  # large enough to measure bandwidth rather than launch latency
# (class, config, tensors the fused step reads besides x and the model output, outputs it writes)
SCHEDULERS = [
    ("DPMSolverMultistepScheduler", {}, 1, 2),
    ("UniPCMultistepScheduler", {}, 2, 3),
    ("EulerAncestralDiscreteScheduler", {}, 1, 2),
    ("EulerDiscreteScheduler", {}, 0, 2),
    ("LMSDiscreteScheduler", {}, 3, 3),
    ("LCMScheduler", {}, 1, 3),
]
PROVIDERS = ["fastdiff", "diffusers", "copy"]
GUIDANCE_SCALE, STEPS, AT = 7.5, 25, 6  # time step AT of a STEPS-step schedule
ROUNDS = {"rounds": 30, "iterations": 3, "warmup_rounds": 3} if CUDA else {"rounds": 10, "iterations": 2,
                                                                           "warmup_rounds": 2}


def prepared(scheduler, x, m_combined, guided: bool):
    """The scheduler with AT steps taken (history filled), and a function that takes step AT again each call."""
    scheduler.set_timesteps(STEPS, device=x.device)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator(device=x.device).manual_seed(0)} if takes_generator else {}
    sample = x
    for t in scheduler.timesteps[:AT]:
        sample = scheduler.step(m_combined, t, sample, **extra).prev_sample
    t, index = scheduler.timesteps[AT], scheduler.step_index

    def step(model_output):
        scheduler._step_index = index
        if guided:  # fastdiff: the [uncond; cond] pair and the scale go in; the combine happens inside the step
            return scheduler.step(model_output, t, x, guidance_scale=GUIDANCE_SCALE, **extra)
        uncond, cond = model_output.chunk(2)  # diffusers pipelines: the eager combine, then step()
        return scheduler.step(uncond + GUIDANCE_SCALE * (cond - uncond), t, x, **extra)
    return step


def step_bytes(numel: int, itemsize: int, reads: int, writes: int) -> int:
    """x and both model-output halves (the model's dtype), the history read and the outputs written (fp32)."""
    return 3 * numel * itemsize + (reads + writes) * numel * 4


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, config, reads, writes", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_scheduler_step(benchmark, synchronized, shape, name, config, reads, writes, provider):
    benchmark.group = f"{name}.step+cfg {'x'.join(map(str, shape))} {str(DTYPE).removeprefix('torch.')}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)
    m = torch.randn((2 * shape[0], *shape[1:]), generator=g, device=DEVICE, dtype=DTYPE)
    nbytes = step_bytes(x.numel(), x.element_size(), reads, writes)
    if provider == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn = lambda m: dst.copy_(src)  # noqa: E731
    elif provider == "fastdiff":
        fn = prepared(getattr(fs, name)(**config), x, m[: shape[0]], guided=True)
    else:
        diffusers = pytest.importorskip("diffusers")
        fn = prepared(getattr(diffusers, name)(**config), x, m[: shape[0]], guided=False)
    benchmark.pedantic(synchronized(fn), args=(m,), **ROUNDS)
    benchmark.extra_info.update(bytes=nbytes, device=str(DEVICE), dtype=str(DTYPE))
    record_roofline(benchmark.extra_info, nbytes, 0, DTYPE)
    if benchmark.stats is not None:
        benchmark.extra_info["gb_per_s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("name, config", [s[:2] for s in SCHEDULERS], ids=[s[0] for s in SCHEDULERS])
def test_the_two_providers_compute_the_same_step(name, config):
    """The timed calls agree (so the comparison is fair): fastdiff's guided step equals diffusers' step on the
    combined output, at the benchmark's place in the schedule."""
    diffusers = pytest.importorskip("diffusers")
    shape = (2, 4, 8, 8)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)
    m = torch.randn((4, *shape[1:]), generator=g, device=DEVICE, dtype=DTYPE)
    ours = prepared(getattr(fs, name)(**config), x, m[:2], guided=True)(m).prev_sample
    theirs = prepared(getattr(diffusers, name)(**config), x, m[:2], guided=False)(m).prev_sample
    err = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
    assert err <= (5e-3 if DTYPE == torch.float16 else 1e-5), f"{name}: fastdiff vs diffusers {err:.2e}"
