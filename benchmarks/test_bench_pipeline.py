"""End to end: DDIM sampling, batch 16, fastdiff vs what people would otherwise run, same weights, side by side.

Two cases:

* ``digits-ddpm 16²``: the shipped digits UNet (converted to diffusers with ``to_diffusers``), DDIM 25 steps with
  classifier-free guidance (scale 2, labels 0–9 cycling): 25 UNet calls at batch 32;
* ``diffusers-sized UNet 32² (6.5M)``: a diffusers UNet2DModel (64/128/128 channels, attention at 16², 32² RGB;
  random weights, converted to fastdiff with ``from_diffusers``), DDIM 50 steps at batch 16, no guidance.

Providers (the baselines run diffusers' UNet and DDIMScheduler in the loop a diffusers user writes: scale the
input, call the UNet on [uncond; cond], guide, step):

    fastdiff               fastdiff's pipeline as ``fastdiff sample`` runs it: on the CPU ``dtype="auto"`` (bf16
                           where the CPU has native bf16, else fp32), channels_last, the native GroupNorm+SiLU kernel;
                           on CUDA the Triton kernels and CUDA graphs
    fastdiff-fp32          the same in fp32 (CPU only)
    fastdiff-compile       fastdiff's pipeline after ``pipe.compile()`` (inductor with freezing), default dtype
    fastdiff-compile-fp32  the same in fp32 (CPU only)
    diffusers              diffusers eager, fp32
    diffusers-bf16         diffusers eager under ``torch.autocast(bfloat16)`` (CPU only)
    compile                diffusers with ``torch.compile(unet)``, fp32
    compile-freeze         the same with inductor freezing (``torch._inductor.config.freezing``: weights constant)
    compile-freeze-bf16    the same under bf16 autocast (CPU only)
    openvino               diffusers' UNet converted by ``openvino.convert_model`` and compiled for the CPU, fp32
                           (``pip install openvino``; skipped when it is not installed)
    openvino-bf16          the same with ``INFERENCE_PRECISION_HINT=bf16``

The first call of every provider (compiles, conversions, graph captures) is not timed; its time is in
``extra_info["first_call_s"]``, so the cost of a compile is reported, not hidden. ``extra_info["dtype"]`` is the
precision each provider computed in.

Every provider gets one more untimed call, then ``FASTDIFF_BENCH_ROUNDS`` (default 3) timed ones; the table reports
their median. ``FASTDIFF_BENCH_QUICK=1`` (used by CI together with --benchmark-disable) runs 3 steps at batch 4 so
the file only checks that everything still runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import pytest
import torch

import fastdiff
import fastdiff.pipelines
import fastdiff.schedulers

diffusers = pytest.importorskip("diffusers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
BATCH = 4 if QUICK else 16
GUIDANCE = 2.0
ROUNDS = int(os.environ.get("FASTDIFF_BENCH_ROUNDS", "3"))  # timed calls per provider, after one untimed warm-up
PROVIDERS = ["fastdiff", "fastdiff-fp32", "fastdiff-compile", "fastdiff-compile-fp32", "diffusers", "diffusers-bf16",
             "compile", "compile-freeze", "compile-freeze-bf16", "openvino", "openvino-bf16"]
CPU_ONLY = {"fastdiff-fp32", "fastdiff-compile-fp32", "diffusers-bf16", "compile-freeze-bf16", "openvino",
            "openvino-bf16"}


def _digits_pair():
    from fastdiff.interop import to_diffusers

    ours = fastdiff.load("digits-ddpm")
    theirs = to_diffusers(ours)
    return ours, theirs.unet.eval(), theirs.scheduler


def _large_pair():
    from fastdiff.interop import from_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=32,
    ).eval()
    scheduler = diffusers.DDIMScheduler()
    ours = fastdiff.pipelines.DiffusionPipeline(from_diffusers(unet).eval(),
                                                fastdiff.schedulers.DDIMScheduler.from_config(scheduler.config),
                                                sample_size=32)
    return ours, unet, scheduler


# case: (builder, steps, guided)
CASES = {"digits-ddpm 16²": (_digits_pair, 3 if QUICK else 25, True),
         "diffusers-sized UNet 32² (6.5M)": (_large_pair, 3 if QUICK else 50, False)}
_cache: dict = {}


def _case(case):
    if case not in _cache:
        builder = CASES[case][0]
        try:
            ours, unet, scheduler = builder()
        except (ImportError, ValueError) as exc:
            pytest.skip(f"{case}: {exc}")
        _cache[case] = (ours, unet.to(DEVICE), scheduler)
    return _cache[case]


def _labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 10


# --------------------------------------------------------------------------------------------- the baselines' loop
def _diffusers_loop(model, scheduler, unet, steps: int, guided: bool, autocast: bool):
    """The sampling loop a diffusers user writes around ``model(x, t, labels) -> noise prediction``."""
    cfg = unet.config
    shape = (BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels = None
    if guided:
        labels = _labels(BATCH).to(DEVICE)
        labels = torch.cat([torch.full_like(labels, cfg.num_class_embeds - 1), labels])  # [null; cond]
    amp = (functools.partial(torch.autocast, "cpu", torch.bfloat16) if autocast else contextlib.nullcontext)

    @torch.inference_mode()
    def run():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator).to(DEVICE) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps)
        with amp():
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
                t_batch = torch.full((model_in.shape[0],), int(t), device=DEVICE)
                out = model(model_in, t_batch, labels).float()
                if guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + GUIDANCE * (cond - uncond)
                x = scheduler.step(out, t, x).prev_sample
        return x

    return run


def _eager(unet):
    return lambda x, t, labels: unet(x, t, class_labels=labels).sample


def _openvino(unet, guided: bool, precision: str):
    """diffusers' UNet through ``openvino.convert_model`` and ``compile_model`` for the CPU at ``precision``."""
    ov = pytest.importorskip("openvino")

    class Plain(torch.nn.Module):  # a tensor in, a tensor out: what convert_model traces
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, labels=None):
            return self.unet(x, t, class_labels=labels, return_dict=False)[0]

    cfg = unet.config
    rows = 2 * BATCH if guided else BATCH
    example = [torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size), torch.full((rows,), 500)]
    if guided:
        example.append(_labels(rows))
    with torch.no_grad():
        model = ov.convert_model(Plain().eval(), example_input=tuple(example))
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    compiled = ov.Core().compile_model(model, "CPU", config)

    def call(x, t, labels):
        inputs = [x.numpy(), t.numpy()] + ([labels.numpy()] if labels is not None else [])
        return torch.from_numpy(compiled(inputs)[0])

    return call


# --------------------------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bench_pipeline(benchmark, warm_up, synchronized, case, provider):
    if CUDA and provider in CPU_ONLY:
        pytest.skip(f"{provider}: a CPU provider")
    ours, unet, scheduler = _case(case)
    steps, guided = CASES[case][1], CASES[case][2]
    settings = contextlib.nullcontext
    dtype = "fp32"
    if provider.startswith("fastdiff"):
        want = torch.float32 if provider.endswith("-fp32") else fastdiff.hub.resolve_dtype("auto", DEVICE)
        ours.to(DEVICE, want or torch.float32)
        dtype = str(ours.dtype).replace("torch.", "")
        if provider.startswith("fastdiff-compile"):
            ours.compile()
        elif CUDA:
            ours.enable_cuda_graph()
        kwargs = {"guidance_scale": GUIDANCE, "class_labels": _labels(BATCH).tolist()} if guided else {}

        def run():
            return ours(batch_size=BATCH, num_inference_steps=steps, generator=0, output_type="pt", progress=False,
                        **kwargs)
    else:
        autocast = provider.endswith("-bf16") and not provider.startswith("openvino")
        dtype = "bf16 autocast" if autocast else "fp32"
        if provider.startswith("openvino"):
            precision = "bf16" if provider.endswith("-bf16") else "f32"
            dtype = precision
            start = time.perf_counter()
            model = _openvino(unet, guided, precision)
            convert_s = time.perf_counter() - start
            benchmark.extra_info["convert_s"] = round(convert_s, 2)
        elif provider.startswith("compile"):
            # compiled code is cached per code object and the guards ignore inductor's settings: drop what the
            # other compile providers made, or compile-freeze would reuse the unfrozen code
            torch._dynamo.reset_code(type(unet).forward.__code__)
            model = _eager(torch.compile(unet))
            if "freeze" in provider:
                import torch._inductor.config as inductor_config

                settings = functools.partial(inductor_config.patch, freezing=True)
        else:
            model = _eager(unet)
        run = _diffusers_loop(model, scheduler, unet, steps, guided, autocast)

    timed = synchronized(run)
    try:
        with settings():
            start = time.perf_counter()
            try:
                warm_up(provider, timed)  # first-call costs (compilation, autotuning, graph capture) are not timed
            except Exception as exc:  # noqa: BLE001 - an inductor/toolchain failure skips a compile provider
                if "compile" not in provider:
                    raise
                pytest.skip(f"{provider} failed: {type(exc).__name__}: {exc}")
            first_call = time.perf_counter() - start
            benchmark.group = (f"pipeline {case} DDIM {steps} steps{' CFG' if guided else ''} batch {BATCH} "
                               f"{DEVICE.type}")
            benchmark.extra_info.update(provider=provider, steps=steps, batch=BATCH, device=DEVICE.type, dtype=dtype,
                                        first_call_s=round(first_call, 2))
            benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        ours.disable_compile()
        ours.to(DEVICE, torch.float32)
