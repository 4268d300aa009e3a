"""Few-step sampling, side by side (issue 18's headline): images per second of the distilled models at their own
step counts against digits-ddpm with DDIM and classifier-free guidance, the same batch of class labels 0–9 cycling,
the same process and threads, one after the other.

Providers (skipped when the model is not shipped):
- ``turbo-1``: digits-turbo, 1 LCMScheduler step (an x0-predicting student: one UNet call per image);
- ``lcm-4``: digits-lcm, 4 LCMScheduler steps (guidance distilled in: 4 UNet calls per image);
- ``ddim-4``: digits-ddpm, 4 DDIM steps, guidance 2 (the fewest DDIM steps at 100% correct digits: 8 UNet calls);
- ``ddim-25``: digits-ddpm, 25 DDIM steps, guidance 2 (``fastdiff sample``'s default: 50 UNet calls).

``extra_info``: steps, batch, images_per_s (from the median of ``FASTDIFF_BENCH_ROUNDS`` timed calls, default 3, after
one untimed call) and unet_calls_per_image. The last test prints every provider's speed-up over ``ddim-25``.
``FASTDIFF_BENCH_QUICK=1`` (CI, with --benchmark-disable) samples 4 images once per provider.

    pytest benchmarks/test_bench_few_step.py -s
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import fastdiff
from fastdiff.evaluation import count_unet_rows

QUICK = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
BATCH = 4 if QUICK else 250  # fastdiff eval's batch
ROUNDS = int(os.environ.get("FASTDIFF_BENCH_ROUNDS", "3"))
# provider → (model, steps, guidance)
PROVIDERS = {"turbo-1": ("digits-turbo", 1, 2.0), "lcm-4": ("digits-lcm", 4, 2.0),
             "ddim-4": ("digits-ddpm", 4, 2.0), "ddim-25": ("digits-ddpm", 25, 2.0)}
MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_few_step(benchmark, provider):
    model, steps, guidance = PROVIDERS[provider]
    if model not in fastdiff.list_models():
        pytest.skip(f"{model} is not shipped in this build")
    pipe = fastdiff.load(model, sampler=None if model != "digits-ddpm" else "ddim", dtype="auto")
    labels = [i % 10 for i in range(BATCH)]

    def sample():
        return pipe(batch_size=BATCH, class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
                    generator=0, output_type="pt", progress=False)

    with count_unet_rows(pipe.unet) as evaluated:  # untimed: first-call work (allocations, dispatch caches)
        images = sample()
    assert images.shape == (BATCH, 1, 16, 16) and torch.isfinite(images).all()
    times = []

    def timed():
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)

    benchmark.group = "few-step digits"
    benchmark.pedantic(timed, rounds=1 if QUICK else ROUNDS, iterations=1, warmup_rounds=0)
    median = statistics.median(times)
    MEDIANS[provider] = median
    benchmark.extra_info.update(model=model, steps=steps, guidance=guidance, batch=BATCH,
                                unet_calls_per_image=evaluated[0] // BATCH,
                                images_per_s=round(BATCH / median, 1), threads=torch.get_num_threads(),
                                dtype=str(pipe.dtype).replace("torch.", ""))


def test_few_step_speedups():
    """The speed-ups over ddim-25 of the providers measured above in this process (run the whole file)."""
    if "ddim-25" not in MEDIANS or len(MEDIANS) < 2:
        pytest.skip("run the whole file: the providers' medians are collected by test_bench_few_step")
    base = BATCH / MEDIANS["ddim-25"]
    lines = [f"few-step digits, batch {BATCH}, {torch.get_num_threads()} thread(s):"]
    for provider, median in MEDIANS.items():
        rate = BATCH / median
        assert rate > 0
        lines.append(f"  {provider:8s} {rate:8.1f} images/s  {rate / base:5.2f}× ddim-25")
    print("\n".join(lines))
