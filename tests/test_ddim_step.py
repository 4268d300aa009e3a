"""fastdiff.ops.ddim_step: the Triton kernel (interpreter on CPU, compiled on CUDA) vs the reference, the reference vs
DDIM's update written out by hand in float64, the reference and the kernel vs diffusers' DDIMScheduler.step, and bad
input. The naive formulas here (and the x0/ε solve in step_cases.py) are written fresh (textbook form), not taken
from fastdiff.reference.
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
from utils import assert_rel_close, poison_empty

import fastdiff
from fastdiff import ops


# --------------------------------------------------------------------------------------------- (a) kernel vs reference
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 7.5])
@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_kernel_matches_reference(device, monkeypatch, prediction_type, guidance_scale, eta, clip_sample_range,
                                  per_sample):
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 9, 11), torch.float32, device,
                                             guidance=guidance_scale is not None, per_sample=per_sample)
    check_kernel_matches_reference(ops.ddim_step, monkeypatch, x, out, a_t, a_prev, eta=eta, noise=noise,
                                   prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                                   guidance_scale=guidance_scale)
    assert fastdiff.counts() == {("ddim_step", kernel_path(device)): 1}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_kernel_shapes_dtypes(device, monkeypatch, shape, dtype, tol, per_sample):
    x, out, noise, a_t, a_prev = step_inputs(shape, dtype, device, guidance=True, per_sample=per_sample)
    prev, x0 = check_kernel_matches_reference(ops.ddim_step, monkeypatch, x, out, a_t, a_prev, tol, eta=1.0,
                                              noise=noise, prediction_type="v_prediction", clip_sample_range=1.5,
                                              guidance_scale=3.0)
    assert prev.dtype == x0.dtype == dtype and prev.shape == x0.shape == x.shape


@pytest.mark.parametrize("noise_given", [False, True], ids=["noise_none", "noise_given"])
def test_kernel_eta0_ignores_noise(device, monkeypatch, noise_given):
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 5, 7), torch.float32, device, guidance=False, per_sample=False)
    ref_prev, ref_x0 = ops.ddim_step(x, out, a_t, a_prev, backend="torch")
    poison_empty(monkeypatch)
    prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=0.0, noise=noise if noise_given else None, backend="triton")
    assert_rel_close(prev, ref_prev, 1e-5, "prev_sample")
    assert_rel_close(x0, ref_x0, 1e-5, "pred_original_sample")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_kernel_use_clipped_model_output(device, monkeypatch, prediction_type):
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 5, 7), torch.float32, device, guidance=True, per_sample=True)
    out = 3 * out  # so that clipping really bites
    check_kernel_matches_reference(ops.ddim_step, monkeypatch, x, out, a_t, a_prev, eta=0.3, noise=noise,
                                   prediction_type=prediction_type, clip_sample_range=0.5, guidance_scale=2.0,
                                   use_clipped_model_output=True)


def test_kernel_mixed_float_and_tensor_alphas(device, monkeypatch):
    x, out, noise, a_t, _ = step_inputs((3, 2, 7, 5), torch.float32, device, guidance=False, per_sample=True)
    check_kernel_matches_reference(ops.ddim_step, monkeypatch, x, out, a_t, 1.0, eta=0.5, noise=noise)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_last_step_returns_x0(device, backend, per_sample):
    """Planted edge case: ᾱ_prev = 1 (diffusers' set_alpha_to_one) makes x_{t-1} = x0 exactly, whatever η."""
    check_last_step_returns_x0(ops.ddim_step, device, backend, per_sample, eta=1.0)


# --------------------------------------------------------------------------------------------- (b) reference vs naive
def naive_ddim(x, out, a_t, a_prev, eta, noise, prediction_type, clip, guidance_scale, use_clipped=False):
    """DDIM (Song et al. 2021, eq. 12 and 16) in float64, per sample, from the forward model x_t = α·x0 + σ·ε."""
    x0, eps = naive_x0_eps(x, out, a_t, prediction_type, clip, guidance_scale)
    x, b = x.double(), x.shape[0]
    a_t = torch.as_tensor(a_t, dtype=torch.float64).expand(b)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64).expand(b)
    prev = torch.empty_like(x)
    for i in range(b):
        if clip is not None and use_clipped:  # ε re-derived from the clipped x0
            eps[i] = (x[i] - math.sqrt(a_t[i]) * x0[i]) / math.sqrt(1 - a_t[i])
        std = eta * math.sqrt((1 - a_prev[i]) / (1 - a_t[i])) * math.sqrt(1 - a_t[i] / a_prev[i])
        prev[i] = math.sqrt(a_prev[i]) * x0[i] + math.sqrt(1 - a_prev[i] - std**2) * eps[i]
        if eta > 0:
            prev[i] += std * noise[i].double()
    return prev, x0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 4.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
def test_reference_matches_naive(prediction_type, guidance_scale, eta, clip_sample_range, per_sample):
    x, out, noise, a_t, a_prev = step_inputs((3, 4, 6, 5), torch.float32, "cpu",
                                             guidance=guidance_scale is not None, per_sample=per_sample)
    prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise, prediction_type=prediction_type,
                             clip_sample_range=clip_sample_range, guidance_scale=guidance_scale, backend="torch")
    want_prev, want_x0 = naive_ddim(x, out, a_t, a_prev, eta, noise, prediction_type, clip_sample_range,
                                    guidance_scale)
    assert_rel_close(prev, want_prev, 1e-5, "prev_sample")
    assert_rel_close(x0, want_x0, 1e-5, "pred_original_sample")


@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_reference_matches_naive_dtypes(dtype, tol):
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 7, 5), dtype, "cpu", guidance=True, per_sample=True)
    prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=0.5, noise=noise, clip_sample_range=2.0, guidance_scale=3.0,
                             use_clipped_model_output=True, backend="torch")
    want_prev, want_x0 = naive_ddim(x, out, a_t, a_prev, 0.5, noise, "epsilon", 2.0, 3.0, use_clipped=True)
    assert_rel_close(prev, want_prev, tol, "prev_sample")
    assert_rel_close(x0, want_x0, tol, "pred_original_sample")


# --------------------------------------------------------------------------------------------- (c) vs diffusers
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [None, 5.0])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("clip_sample_range", [None, 1.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float_alphas", "tensor_alphas"])
@pytest.mark.parametrize("use_clipped", [False, True], ids=["model_eps", "clipped_eps"])
def test_matches_diffusers(backend, prediction_type, guidance_scale, eta, clip_sample_range, per_sample, use_clipped):
    diffusers = pytest.importorskip("diffusers")
    skip_if_no_kernels(backend)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, clip_sample=clip_sample_range is not None,
        clip_sample_range=clip_sample_range or 1.0, set_alpha_to_one=True,
    )
    scheduler.set_timesteps(20)
    timesteps = [int(t) for t in scheduler.timesteps]
    step = 1000 // 20
    b, shape = 3, (4, 6, 5)
    picks = [timesteps[i] for i in (2, 10, 19)] if per_sample else [timesteps[7]] * b
    x, out, noise, _, _ = step_inputs((b, *shape), torch.float32, "cpu", guidance=guidance_scale is not None,
                                      per_sample=False)
    guided = out if guidance_scale is None else out[:b] + guidance_scale * (out[b:] - out[:b])

    def alpha_prev_of(t):
        return scheduler.alphas_cumprod[t - step] if t - step >= 0 else scheduler.final_alpha_cumprod

    want = [scheduler.step(guided[i : i + 1], picks[i], x[i : i + 1], eta=eta, use_clipped_model_output=use_clipped,
                           variance_noise=noise[i : i + 1], return_dict=False) for i in range(b)]
    want_prev, want_x0 = torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])
    a_t = torch.stack([scheduler.alphas_cumprod[t] for t in picks])
    a_prev = torch.stack([torch.as_tensor(alpha_prev_of(t)) for t in picks])
    if not per_sample:
        a_t, a_prev = float(a_t[0]), float(a_prev[0])
    prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise, prediction_type=prediction_type,
                             clip_sample_range=clip_sample_range, guidance_scale=guidance_scale,
                             use_clipped_model_output=use_clipped, backend=backend)
    assert_rel_close(prev, want_prev, 1e-5, "prev_sample vs diffusers")
    assert_rel_close(x0, want_x0, 1e-5, "pred_original_sample vs diffusers")


# --------------------------------------------------------------------------------------------- no host reads
def test_tensor_alphas_on_meta_device():
    """Validation and the reference never read tensor values: everything on the meta device still runs."""
    meta = torch.device("meta")
    x, out, noise = (torch.empty(2, 4, 8, 8, device=meta) for _ in range(3))
    out = torch.empty(4, 4, 8, 8, device=meta)
    a_t, a_prev = torch.empty(2, device=meta), torch.empty(2, device=meta)
    prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=0.5, noise=noise, clip_sample_range=1.0, guidance_scale=2.0,
                             backend="torch")
    assert prev.device == x0.device == meta and prev.shape == x.shape


def test_kernel_does_not_read_tensor_alphas(device, monkeypatch):
    check_kernel_does_not_read_tensor_alphas(ops.ddim_step, device, monkeypatch, eta=0.5)


def test_opcheck():
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 5, 7), torch.float32, "cpu", guidance=True, per_sample=True)
    op = torch.ops.fastdiff.ddim_step.default
    torch.library.opcheck(op, (x, out, a_t, a_prev, 0.0, 0.0, 0.5, noise, "v_prediction", 1.0, 2.0, False, "torch"))
    torch.library.opcheck(op, (x, out[:2], None, None, 0.3, 0.8, 0.0, None, "epsilon", None, None, False, "torch"))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, error, match", [
    ({"prediction_type": "x0"}, ValueError, "prediction_type"),
    ({"eta": -0.1}, ValueError, "eta"),
    ({"eta": 0.5}, ValueError, "noise"),  # η > 0 without noise
    ({"alpha_prod_t": 0.0}, ValueError, "alpha_prod_t"),
    ({"alpha_prod_t": 1.0}, ValueError, "alpha_prod_t"),  # 1 − ᾱ_t divides
    ({"alpha_prod_t": -0.2}, ValueError, "alpha_prod_t"),
    ({"alpha_prod_t_prev": 1.5}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t_prev": float("nan")}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t": True}, TypeError, "alpha_prod_t"),
    ({"alpha_prod_t": "0.5"}, TypeError, "alpha_prod_t"),
    ({"alpha_prod_t": torch.rand(3)}, ValueError, "alpha_prod_t"),  # wrong shape: B = 2
    ({"alpha_prod_t_prev": torch.rand(2, 1)}, ValueError, "alpha_prod_t_prev"),
    ({"alpha_prod_t": torch.ones(2, dtype=torch.int64)}, TypeError, "alpha_prod_t"),
    ({"alpha_prod_t": torch.rand(2, device="meta")}, ValueError, "alpha_prod_t"),
    ({"model_output": torch.randn(2, 3, 4, 4, dtype=torch.float16)}, TypeError, "model_output"),
    ({"model_output": torch.randn(2, 3, 4, 5)}, ValueError, "model_output"),
    ({"model_output": torch.randn(2, 3, 4, 4, device="meta")}, ValueError, "model_output"),
    ({"model_output": torch.randn(3, 3, 4, 4), "guidance_scale": 2.0}, ValueError, "even batch"),
    ({"model_output": torch.randn(2, 3, 4, 4), "guidance_scale": 2.0}, ValueError, "guidance_scale"),
    ({"model_output": torch.randn(6, 3, 4, 4), "guidance_scale": 2.0}, ValueError, "guidance_scale"),
    ({"guidance_scale": "7.5"}, TypeError, "guidance_scale"),
    ({"noise": torch.randn(2, 3, 4, 5), "eta": 0.5}, ValueError, "noise"),
    ({"noise": torch.randn(2, 3, 4, 4, device="meta"), "eta": 0.5}, ValueError, "noise"),
    ({"clip_sample_range": 0.0}, ValueError, "clip_sample_range"),
    ({"sample": torch.ones(2, 3, 4, 4, dtype=torch.int32)}, TypeError, "sample"),
    ({"sample": [1.0, 2.0]}, TypeError, "sample"),
    ({"backend": "cuda"}, ValueError, "backend"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_input(change, error, match):
    check_bad_input(ops.ddim_step, change, error, match)
