"""fastdiff.ops.ddpm_step: the Triton kernel (interpreter on CPU, compiled on CUDA) vs the reference, the reference vs
the DDPM posterior written out by hand in float64 (Gaussian conditioning, and the chapter's ε form), the reference and
the kernel vs diffusers' DDPMScheduler.step, and bad input. The naive formulas here (and the x0/ε solve in
step_cases.py) are written fresh.
"""

from __future__ import annotations

import math

import pytest
import torch
from step_cases import (
    DTYPES,
    PREDICTION_TYPES,
    SHAPES,
    check_bad_input,
    check_kernel_does_not_read_tensor_alphas,
    check_kernel_matches_reference,
    check_last_step_returns_x0,
    kernel_path,
    naive_x0_eps,
    skip_if_no_kernels,
    step_inputs,
)
from utils import assert_rel_close

import fastdiff
from fastdiff import ops

VARIANCE_TYPES = ["fixed_small", "fixed_large"]


# --------------------------------------------------------------------------------------------- (a) kernel vs reference
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 7.5])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("noise_given", [False, True], ids=["noise_none", "noise_given"])
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_kernel_matches_reference(device, monkeypatch, prediction_type, guidance_scale, variance_type, noise_given,
                                  clip_sample_range, per_sample):
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 9, 11), torch.float32, device,
                                             guidance=guidance_scale is not None, per_sample=per_sample)
    check_kernel_matches_reference(ops.ddpm_step, monkeypatch, x, out, a_t, a_prev,
                                   noise=noise if noise_given else None, variance_type=variance_type,
                                   prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                                   guidance_scale=guidance_scale)
    assert fastdiff.counts() == {("ddpm_step", kernel_path(device)): 1}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_kernel_shapes_dtypes(device, monkeypatch, shape, dtype, tol, per_sample):
    x, out, noise, a_t, a_prev = step_inputs(shape, dtype, device, guidance=True, per_sample=per_sample)
    prev, x0 = check_kernel_matches_reference(ops.ddpm_step, monkeypatch, x, out, a_t, a_prev, tol, noise=noise,
                                              prediction_type="epsilon", clip_sample_range=1.5, guidance_scale=3.0)
    assert prev.dtype == x0.dtype == dtype and prev.shape == x0.shape == x.shape


def test_kernel_mixed_float_and_tensor_alphas(device, monkeypatch):
    x, out, noise, _, a_prev = step_inputs((3, 2, 7, 5), torch.float32, device, guidance=False, per_sample=True)
    check_kernel_matches_reference(ops.ddpm_step, monkeypatch, x, out, 0.02, a_prev, noise=noise)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_last_step_returns_x0(device, backend, per_sample):
    """Planted edge case: ᾱ_prev = 1 (the last step) gives μ̃ = x0 and σ ≈ 0 (β̃ = 0, clamped at 1e-20)."""
    check_last_step_returns_x0(ops.ddpm_step, device, backend, per_sample)


# --------------------------------------------------------------------------------------------- (b) reference vs naive
def naive_ddpm(x, out, a_t, a_prev, noise, variance_type, prediction_type, clip, guidance_scale):
    """Ancestral DDPM step in float64, per sample: x0 from the forward model x_t = α·x0 + σ·ε, then the posterior
    q(x_{t-1} | x_t, x0) by Gaussian conditioning of prior N(√ᾱ_prev·x0, 1 − ᾱ_prev) on x_t ~ N(√α_t·x_{t-1}, β_t)."""
    x0, _ = naive_x0_eps(x, out, a_t, prediction_type, clip, guidance_scale)
    x, b = x.double(), x.shape[0]
    a_t = torch.as_tensor(a_t, dtype=torch.float64).expand(b)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64).expand(b)
    prev = torch.empty_like(x)
    for i in range(b):
        alpha_step = float(a_t[i] / a_prev[i])  # α_t of this (possibly strided) step
        beta_step = 1 - alpha_step
        precision = 1 / (1 - a_prev[i]) + alpha_step / beta_step
        posterior_var = 1 / precision  # β̃_t
        mean = posterior_var * (math.sqrt(a_prev[i]) * x0[i] / (1 - a_prev[i]) + math.sqrt(alpha_step) * x[i] / beta_step)
        if noise is not None:
            var = posterior_var if variance_type == "fixed_small" else beta_step
            mean = mean + math.sqrt(var) * noise[i].double()
        prev[i] = mean
    return prev, x0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 4.0])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("noise_given", [False, True], ids=["noise_none", "noise_given"])
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_reference_matches_naive(prediction_type, guidance_scale, variance_type, noise_given, clip_sample_range,
                                 per_sample):
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 6, 5), torch.float32, "cpu",
                                             guidance=guidance_scale is not None, per_sample=per_sample)
    noise = noise if noise_given else None
    prev, x0 = ops.ddpm_step(x, out, a_t, a_prev, noise=noise, variance_type=variance_type,
                             prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                             guidance_scale=guidance_scale, backend="torch")
    want_prev, want_x0 = naive_ddpm(x, out, a_t, a_prev, noise, variance_type, prediction_type, clip_sample_range,
                                    guidance_scale)
    assert_rel_close(prev, want_prev, 1e-5, "prev_sample")
    assert_rel_close(x0, want_x0, 1e-5, "pred_original_sample")


@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_reference_matches_naive_dtypes(dtype, tol):
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 7, 5), dtype, "cpu", guidance=True, per_sample=True)
    prev, x0 = ops.ddpm_step(x, out, a_t, a_prev, noise=noise, prediction_type="v_prediction", clip_sample_range=2.0,
                             guidance_scale=3.0, backend="torch")
    want_prev, want_x0 = naive_ddpm(x, out, a_t, a_prev, noise, "fixed_small", "v_prediction", 2.0, 3.0)
    assert_rel_close(prev, want_prev, tol, "prev_sample")
    assert_rel_close(x0, want_x0, tol, "pred_original_sample")


def test_reference_matches_chapter_epsilon_form():
    """The seed chapter's sampler: x_{t-1} = (1/√α_t)·(x_t − β_t/√(1 − ᾱ_t)·ε) + √β_t·z (unclipped ε, fixed_large)."""
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 6, 5), torch.float32, "cpu", guidance=False, per_sample=False)
    prev, _ = ops.ddpm_step(x, out, a_t, a_prev, noise=noise, variance_type="fixed_large", backend="torch")
    alpha_step = a_t / a_prev
    beta_step = 1 - alpha_step
    want = (x.double() - beta_step / math.sqrt(1 - a_t) * out.double()) / math.sqrt(alpha_step)
    want = want + math.sqrt(beta_step) * noise.double()
    assert_rel_close(prev, want, 1e-5, "prev_sample vs the chapter's formula")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_eta1_equals_ddpm_fixed_small(backend, prediction_type):
    """DDIM with η = 1 is the DDPM posterior with σ² = β̃_t (Song et al. 2021, sec. 4.1), for unclipped x0."""
    skip_if_no_kernels(backend)
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 6, 5), torch.float32, "cpu", guidance=True, per_sample=True)
    kwargs = {"noise": noise, "prediction_type": prediction_type, "guidance_scale": 2.0, "backend": backend}
    ddpm_prev, ddpm_x0 = ops.ddpm_step(x, out, a_t, a_prev, variance_type="fixed_small", **kwargs)
    ddim_prev, ddim_x0 = ops.ddim_step(x, out, a_t, a_prev, eta=1.0, **kwargs)
    assert_rel_close(ddim_prev, ddpm_prev, 1e-5, "DDIM(η=1) vs DDPM prev_sample")
    assert_rel_close(ddim_x0, ddpm_x0, 1e-6, "pred_original_sample")


# --------------------------------------------------------------------------------------------- (c) vs diffusers
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 5.0])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_matches_diffusers(backend, prediction_type, guidance_scale, variance_type, clip_sample_range, per_sample):
    diffusers = pytest.importorskip("diffusers")
    skip_if_no_kernels(backend)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type=variance_type,
        prediction_type=prediction_type, clip_sample=clip_sample_range is not None,
        clip_sample_range=clip_sample_range or 1.0,
    )
    scheduler.set_timesteps(25)
    timesteps = [int(t) for t in scheduler.timesteps]
    b, shape = 3, (4, 6, 5)
    # per-sample: three timesteps, the last one (no noise) included; float alphas: one mid-chain timestep
    picks = [timesteps[i] for i in (1, 12, 24)] if per_sample else [timesteps[9]] * b
    x, out, _, _, _ = step_inputs((b, *shape), torch.float32, "cpu", guidance=guidance_scale is not None,
                                  per_sample=False)
    guided = out if guidance_scale is None else out[:b] + guidance_scale * (out[b:] - out[:b])

    want = [scheduler.step(guided[i : i + 1], picks[i], x[i : i + 1], generator=torch.Generator().manual_seed(i),
                           return_dict=False) for i in range(b)]
    want_prev, want_x0 = torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])
    # the same z diffusers drew (randn_tensor on the CPU with that generator); none on the last step (t = 0)
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(i)) * (picks[i] > 0)
                       for i in range(b)])

    def alpha_prev_of(t):
        prev_t = int(scheduler.previous_timestep(t))
        return scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one

    a_t = torch.stack([scheduler.alphas_cumprod[t] for t in picks])
    a_prev = torch.stack([torch.as_tensor(alpha_prev_of(t)) for t in picks])
    if not per_sample:
        a_t, a_prev = float(a_t[0]), float(a_prev[0])
    prev, x0 = ops.ddpm_step(x, out, a_t, a_prev, noise=noise, variance_type=variance_type,
                             prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                             guidance_scale=guidance_scale, backend=backend)
    assert_rel_close(prev, want_prev, 1e-5, "prev_sample vs diffusers")
    assert_rel_close(x0, want_x0, 1e-5, "pred_original_sample vs diffusers")


# --------------------------------------------------------------------------------------------- no host reads
def test_tensor_alphas_on_meta_device():
    """Validation and the reference never read tensor values: everything on the meta device still runs."""
    meta = torch.device("meta")
    x, noise = torch.empty(2, 4, 8, 8, device=meta), torch.empty(2, 4, 8, 8, device=meta)
    out = torch.empty(4, 4, 8, 8, device=meta)
    a_t, a_prev = torch.empty(2, device=meta), torch.empty(2, device=meta)
    for variance_type in VARIANCE_TYPES:
        prev, x0 = ops.ddpm_step(x, out, a_t, a_prev, noise=noise, variance_type=variance_type, clip_sample_range=1.0,
                                 guidance_scale=2.0, backend="torch")
        assert prev.device == x0.device == meta and prev.shape == x.shape


def test_kernel_does_not_read_tensor_alphas(device, monkeypatch):
    check_kernel_does_not_read_tensor_alphas(ops.ddpm_step, device, monkeypatch)


def test_opcheck():
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 5, 7), torch.float32, "cpu", guidance=True, per_sample=True)
    op = torch.ops.fastdiff.ddpm_step.default
    torch.library.opcheck(op, (x, out, a_t, a_prev, 0.0, 0.0, noise, "fixed_large", "sample", 1.0, 2.0, "torch"))
    torch.library.opcheck(op, (x, out[:2], None, None, 0.3, 0.8, None, "fixed_small", "epsilon", None, None, "torch"))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, error, match", [
    ({"prediction_type": "x0"}, ValueError, "prediction_type"),
    ({"variance_type": "learned_range"}, ValueError, "variance_type"),
    ({"variance_type": None}, ValueError, "variance_type"),
    ({"alpha_prod_t": 0.0}, ValueError, "alpha_prod_t"),
    ({"alpha_prod_t": 1.0}, ValueError, "alpha_prod_t"),  # 1 − ᾱ_t divides
    ({"alpha_prod_t_prev": 1.0 + 1e-6}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t_prev": float("inf")}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t": None}, TypeError, "alpha_prod_t"),
    ({"alpha_prod_t": torch.rand(1)}, ValueError, "alpha_prod_t"),  # wrong shape: B = 2
    ({"alpha_prod_t_prev": torch.rand(())}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t_prev": torch.rand(2, device="meta")}, ValueError, "alpha_prod_t_prev"),
    ({"model_output": torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)}, TypeError, "model_output"),
    ({"model_output": torch.randn(2, 3, 16)}, ValueError, "model_output"),
    ({"model_output": torch.randn(2, 3, 4, 4, device="meta")}, ValueError, "model_output"),
    ({"model_output": torch.randn(5, 3, 4, 4), "guidance_scale": 2.0}, ValueError, "even batch"),
    ({"model_output": torch.randn(4, 3, 4, 5), "guidance_scale": 2.0}, ValueError, "guidance_scale"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
    ({"noise": torch.randn(2, 3, 4)}, ValueError, "noise"),
    ({"noise": torch.randn(2, 3, 4, 4, device="meta")}, ValueError, "noise"),
    ({"noise": torch.ones(2, 3, 4, 4, dtype=torch.int64)}, TypeError, "noise"),
    ({"clip_sample_range": -1.0}, ValueError, "clip_sample_range"),
    ({"sample": torch.ones(2, 3, 4, 4, dtype=torch.float64)}, TypeError, "sample"),
    ({"backend": "gpu"}, ValueError, "backend"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_input(change, error, match):
    check_bad_input(ops.ddpm_step, change, error, match)
