"""End to end: DDIM sampling, batch 16, fastdiff vs diffusers' pipeline with identical weights, side by side.

Two UNets: the shipped digits UNet (fastdiff's ``digits-ddpm``, converted to diffusers with ``to_diffusers``) and a
larger diffusers-sized UNet2DModel (64/128/128 channels, attention at 16², 32² RGB; random weights, converted to
fastdiff with ``from_diffusers``). Providers:

    fastdiff          fastdiff's DiffusionPipeline (fused kernels on CUDA, CUDA graphs there; the reference path on
                      CPU)
    diffusers         diffusers' DDIMPipeline with the same weights and scheduler config
    compile           diffusers' pipeline with ``torch.compile(unet)`` (static shapes; the compile is the untimed
                      warm-up)
    compile-freeze    the same with inductor freezing (``torch._inductor.config.freezing``: weights as constants)
    fastdiff-compile  fastdiff's pipeline after ``pipe.compile()`` (inductor, freezing)

The first call of every provider (compiles, graph captures) is not timed; its time is in ``extra_info["first_call_s"]``.

50 steps as the issue asks; ``FASTDIFF_BENCH_QUICK=1`` (used by CI together with --benchmark-disable) runs 3 steps
at batch 4 so the file only checks that everything still runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
STEPS = 3 if QUICK else 50
BATCH = 4 if QUICK else 16
PROVIDERS = ["fastdiff", "diffusers", "compile", "compile-freeze", "fastdiff-compile"]


def _digits_pair():
    from fastdiff.interop import to_diffusers

    ours = fastdiff.load("digits-ddpm")  # class-conditional: both libraries sample its null class here
    return ours, to_diffusers(ours)


def _large_pair():
    from fastdiff.interop import from_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=32,
    ).eval()
    scheduler = diffusers.DDIMScheduler()
    theirs = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    ours = fastdiff.pipelines.DiffusionPipeline(from_diffusers(unet).eval(),
                                                fastdiff.schedulers.DDIMScheduler.from_config(scheduler.config),
                                                sample_size=32)
    return ours, theirs


CASES = {"digits-ddpm 16²": _digits_pair, "diffusers-sized UNet 32² (6.5M)": _large_pair}
_cache: dict = {}


def _pair(case):
    if case not in _cache:
        try:
            ours, theirs = CASES[case]()
        except (ImportError, ValueError) as exc:
            pytest.skip(f"{case}: {exc}")
        ours.to(DEVICE)
        theirs.to(DEVICE)
        theirs.set_progress_bar_config(disable=True)
        _cache[case] = (ours, theirs)
    return _cache[case]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bench_pipeline(benchmark, warm_up, synchronized, case, provider):
    ours, theirs = _pair(case)
    settings = contextlib.nullcontext
    if provider in ("fastdiff", "fastdiff-compile"):
        if provider == "fastdiff-compile":
            ours.compile()
        elif CUDA:
            ours.enable_cuda_graph()

        def run():
            return ours(batch_size=BATCH, num_inference_steps=STEPS, generator=0, output_type="pt", progress=False)
    else:
        pipe = theirs
        if provider in ("compile", "compile-freeze"):
            # compiled code is cached per code object and the guards ignore inductor's settings: drop what the
            # other compile provider made, or compile-freeze would reuse the unfrozen code
            torch._dynamo.reset_code(type(theirs.unet).forward.__code__)
            pipe = type(theirs)(unet=torch.compile(theirs.unet), scheduler=theirs.scheduler)
            pipe.set_progress_bar_config(disable=True)
        if provider == "compile-freeze":
            import torch._inductor.config as inductor_config

            settings = functools.partial(inductor_config.patch, freezing=True)

        def run():
            return pipe(batch_size=BATCH, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="np")

    timed = synchronized(run)
    try:
        with settings():
            start = time.perf_counter()
            warm_up(provider, timed)  # first-call costs (compilation, autotuning, graph capture) are not timed
            first_call = time.perf_counter() - start
            benchmark.group = f"pipeline {case} DDIM {STEPS} steps batch {BATCH} {DEVICE.type}"
            benchmark.extra_info.update(provider=provider, steps=STEPS, batch=BATCH, device=DEVICE.type,
                                        first_call_s=round(first_call, 2))
            benchmark.pedantic(timed, rounds=1 if not CUDA else 3, iterations=1, warmup_rounds=0)
    finally:
        ours.disable_compile()
