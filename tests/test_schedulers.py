"""Schedulers without diffusers: values derived by hand from the papers' formulas, exact recovery of x0 with an
oracle model, the config/mapping API, and bad input. Parity with diffusers: test_schedulers_parity.py; config files
and pipelines with diffusers: test_schedulers_interop.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pickle
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from utils import assert_rel_close

import fastdiff
from fastdiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    ConfigDict,
    SchedulerOutput,
    TimestepsNotSetError,
)

ALL = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
       EulerAncestralDiscreteScheduler]
SIGMA_BASED = [DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler]
IDS = [c.__name__ for c in ALL]
SHAPE = (2, 3, 4, 4)


# --------------------------------------------------------------------------------------------- β schedules by hand
def test_linear_betas_by_hand():
    betas = DDPMScheduler().betas.double()
    for i in (0, 1, 500, 999):
        assert betas[i].item() == pytest.approx(1e-4 + i / 999 * (0.02 - 1e-4), rel=1e-6)


def test_scaled_linear_betas_by_hand():
    betas = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas.double()
    for i in (0, 250, 999):
        expected = (math.sqrt(0.00085) + i / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
        assert betas[i].item() == pytest.approx(expected, rel=1e-6)


def test_cosine_betas_by_hand():
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t), capped at 0.999."""
    betas = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.double()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-6)
    assert betas[500].item() == pytest.approx(1 - f(501 / 1000) / f(500 / 1000), rel=1e-6)
    assert betas[999].item() == pytest.approx(0.999, rel=1e-7)  # ᾱ(1) = 0: the cap


def test_alphas_cumprod_is_the_product():
    s = DDIMScheduler()
    b = s.betas.double()
    assert s.alphas_cumprod[2].item() == pytest.approx(((1 - b[0]) * (1 - b[1]) * (1 - b[2])).item(), rel=1e-6)


def test_trained_betas_override_the_schedule():
    betas = np.linspace(1e-4, 0.03, 50)
    s = DDPMScheduler(num_train_timesteps=50, trained_betas=betas, beta_schedule="squaredcos_cap_v2")
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=torch.float32))


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_zero_terminal_snr(cls):
    """Lin et al. 2024, Algorithm 1: ᾱ_T = 0 (σ-space schedulers keep 2⁻²⁴ so σ_T stays finite), ᾱ_1 unchanged."""
    plain, rescaled = cls(), cls(rescale_betas_zero_snr=True)
    expected_last = 2**-24 if cls in SIGMA_BASED else 0.0
    assert rescaled.alphas_cumprod[-1].item() == expected_last
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    # and it still samples (for DDIM/DDPM ᾱ_T = 0 goes to the fused ops as a per-sample tensor)
    rescaled_v = cls(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    out = _run(rescaled_v, 5, _oracle_model(rescaled_v, torch.rand(SHAPE) * 2 - 1, torch.randn(SHAPE)))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- timesteps by hand
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("spacing, n, offset, expected", [
    ("leading", 10, 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("leading", 10, 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("leading", 3, 0, [666, 333, 0]),  # ⌊1000/3⌋ = 333
    ("trailing", 10, 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("trailing", 3, 0, [999, 666, 332]),  # round(1000 − i·333.3) − 1
    ("linspace", 10, 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ("linspace", 4, 0, [999, 666, 333, 0]),
    ("trailing", 1, 0, [999]),
])
def test_ddim_ddpm_timesteps_by_hand(cls, spacing, n, offset, expected):
    s = cls(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == expected


@pytest.mark.parametrize("spacing, n, expected", [
    ("linspace", 10, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]),  # 11 points over [0, 999], t = 0 dropped
    ("leading", 4, [800, 600, 400, 200]),  # ⌊1000/5⌋ = 200
    ("trailing", 4, [999, 749, 499, 249]),
])
def test_dpm_solver_timesteps_by_hand(spacing, n, expected):
    s = DPMSolverMultistepScheduler(timestep_spacing=spacing)
    s.set_timesteps(n)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == expected
    sigma = ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5  # σ at the chosen timesteps, then σ = 0
    assert torch.equal(s.sigmas, torch.cat([sigma[s.timesteps], torch.zeros(1)]))


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_euler_timesteps_by_hand(cls):
    s = cls()  # linspace: fractional fp32 timesteps
    s.set_timesteps(3)
    assert s.timesteps.dtype == torch.float32
    assert s.timesteps.tolist() == [999.0, 499.5, 0.0]
    sigma = (((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5).double()
    mid = 0.5 * (sigma[499] + sigma[500])  # linear interpolation at t = 499.5
    assert s.sigmas[1].item() == pytest.approx(mid.item(), rel=1e-6)
    assert s.sigmas[-1].item() == 0.0
    assert s.init_noise_sigma == pytest.approx(sigma[999].item(), rel=1e-6)  # σ_max
    leading = cls(timestep_spacing="leading")
    leading.set_timesteps(4)
    assert leading.timesteps.tolist() == [750.0, 500.0, 250.0, 0.0]
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(sigma[750].item() ** 2 + 1), rel=1e-6)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_karras_sigmas_by_hand(cls):
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n − 1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7."""
    s = cls(use_karras_sigmas=True)
    n = 10
    s.set_timesteps(n)
    train = (((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5).double()
    sigma_min, sigma_max = train[0].item(), train[-1].item()
    assert s.sigmas[0].item() == pytest.approx(sigma_max, rel=1e-6)
    assert s.sigmas[n - 1].item() == pytest.approx(sigma_min, rel=1e-6)
    assert s.sigmas[n].item() == 0.0
    for i in (3, 5):
        expected = (sigma_max ** (1 / 7) + i / (n - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
        assert s.sigmas[i].item() == pytest.approx(expected, rel=1e-6)
    assert s.timesteps[0].item() == 999 and s.timesteps[-1].item() == 0  # σ_max ↔ t = T − 1, σ_min ↔ t = 0


def test_euler_karras_sigma_range_from_config():
    s = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min")
    s.set_timesteps(6)
    assert s.sigmas[0].item() == pytest.approx(10.0, rel=1e-6)
    assert s.sigmas[5].item() == pytest.approx(0.1, rel=1e-6)
    sigma_t0 = math.sqrt((1 - s.alphas_cumprod[0].item()) / s.alphas_cumprod[0].item())
    assert s.sigmas[6].item() == pytest.approx(sigma_t0, rel=1e-6)  # final σ = σ at training timestep 0


# --------------------------------------------------------------------------------------------- single steps by hand
def test_ddim_step_by_hand():
    """Song et al. 2021, eq. 12 with η = 0 on one number: x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε."""
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)  # leading: prev of t = 500 is 400
    x, eps = 0.5, 0.1
    a, a_prev = s.alphas_cumprod[500].item(), s.alphas_cumprod[400].item()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    out = s.step(torch.full((1, 1), eps), 500, torch.full((1, 1), x))
    assert out.pred_original_sample.item() == pytest.approx(x0, rel=1e-6)
    assert out.prev_sample.item() == pytest.approx(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, rel=1e-6)


def test_ddim_eta_noise_by_hand():
    """σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)) (eq. 16) on given variance_noise."""
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x, eps, z, eta = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE), 0.7
    a, a_prev = s.alphas_cumprod[500].double().item(), s.alphas_cumprod[400].double().item()
    std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps.double() + std * z.double()
    out = s.step(eps, torch.tensor(500), x, eta=eta, variance_noise=z)
    assert_rel_close(out.prev_sample, expected, 1e-6, "DDIM η-step")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_by_hand(variance_type):
    """Ho et al. 2020, eqs. 6–7: μ̃ = √ᾱ_prev·β_t/(1 − ᾱ_t)·x̂0 + √α_t·(1 − ᾱ_prev)/(1 − ᾱ_t)·x_t, σ² = β̃_t or β_t,
    with z drawn from the generator as torch.randn(sample.shape)."""
    s = DDPMScheduler(clip_sample=False, variance_type=variance_type)
    s.set_timesteps(10)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    a, a_prev = s.alphas_cumprod[500].double().item(), s.alphas_cumprod[400].double().item()
    alpha_t, beta_t = a / a_prev, 1 - a / a_prev
    x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta_t / (1 - a) * x0 + math.sqrt(alpha_t) * (1 - a_prev) / (1 - a) * x.double()
    var = (1 - a_prev) / (1 - a) * beta_t if variance_type == "fixed_small" else beta_t
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).double()
    out = s.step(eps, 500, x, generator=torch.Generator().manual_seed(7))
    assert_rel_close(out.prev_sample, mean + math.sqrt(var) * z, 1e-6, "DDPM step")
    assert_rel_close(out.pred_original_sample, x0, 1e-6, "DDPM x0")


def test_euler_ancestral_step_by_hand():
    """σ_up² = σ_next²(σ² − σ_next²)/σ², σ_down² = σ_next² − σ_up²; x ← x̂0 + σ_down·(x − x̂0)/σ + σ_up·z."""
    s = EulerAncestralDiscreteScheduler(prediction_type="sample")
    s.set_timesteps(10)
    sigma, sigma_next = s.sigmas[0].double().item(), s.sigmas[1].double().item()
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x, x0 = torch.randn(SHAPE) * sigma, torch.rand(SHAPE)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).double()
    expected = x0.double() + sigma_down / sigma * (x.double() - x0.double()) + sigma_up * z
    out = s.step(x0, s.timesteps[0], x, generator=torch.Generator().manual_seed(3))
    assert_rel_close(out.prev_sample, expected, 1e-6, "Euler ancestral step")


def test_dpm_solver_first_step_by_hand():
    """DPM-Solver++(1): x_t = (σ_t/σ_s)·x_s − α_t(e^(−h) − 1)·x̂0, λ = log(α/σ), α = 1/√(σ² + 1), σ_t = σ·α."""
    s = DPMSolverMultistepScheduler(prediction_type="sample")
    s.set_timesteps(10)
    vp = lambda sig: (1 / math.sqrt(sig**2 + 1), sig / math.sqrt(sig**2 + 1))
    (a_s, s_s), (a_t, s_t) = vp(s.sigmas[0].double().item()), vp(s.sigmas[1].double().item())
    h = math.log(a_t / s_t) - math.log(a_s / s_s)
    x, x0 = torch.randn(SHAPE), torch.rand(SHAPE)
    out = s.step(x0, s.timesteps[0], x)
    assert_rel_close(out.prev_sample, s_t / s_s * x.double() - a_t * (math.exp(-h) - 1) * x0.double(), 1e-6, "DPM")


# --------------------------------------------------------------------------------------------- oracle model
def _oracle_model(scheduler, x0: torch.Tensor, eps: torch.Tensor):
    """A model that knows x0: it returns the ε, x0 or v consistent with the sample it is given, at the σ/ᾱ of the
    scheduler's current step (VP: x = √ᾱ·x0 + √(1 − ᾱ)·ε; VE schedulers: x = x0 + σ·ε, the model sees x/√(σ² + 1))."""
    pred = scheduler.config.prediction_type

    def model(model_input, t, sample):
        if isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            a = scheduler.alphas_cumprod[int(t)].double().item()
            alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        else:
            i = scheduler.step_index if scheduler.step_index is not None else 0
            sig = scheduler.sigmas[i].double().item()
            alpha, sigma = 1 / math.sqrt(sig**2 + 1), sig / math.sqrt(sig**2 + 1)
            if not isinstance(scheduler, DPMSolverMultistepScheduler):  # VE: the VP sample is the scaled input
                sample = model_input
        implied_eps = (sample.double() - alpha * x0.double()) / sigma
        out = {"epsilon": implied_eps, "sample": x0.double(),
               "v_prediction": alpha * implied_eps - sigma * x0.double()}[pred]
        return out.float()

    return model


def _run(scheduler, n, model, x=None, generator=None, step_kwargs=None):
    scheduler.set_timesteps(n)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t, x), t, x, generator=generator, **(step_kwargs or {})).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("cls, kwargs, step_kwargs", [
    (DDIMScheduler, {}, {}),
    (DDIMScheduler, {"set_alpha_to_one": True, "timestep_spacing": "trailing"}, {"eta": 1.0}),
    (DDPMScheduler, {}, {}),
    (DPMSolverMultistepScheduler, {}, {}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "lower_order_final": False}, {}),
    (EulerDiscreteScheduler, {}, {}),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True}, {}),
    (EulerAncestralDiscreteScheduler, {}, {}),
], ids=["ddim", "ddim-eta1", "ddpm", "dpm", "dpm-karras", "euler", "euler-karras", "euler-a"])
def test_oracle_model_recovers_x0(cls, kwargs, step_kwargs, prediction_type):
    """With a model that knows x0, every sampler stays on the exact trajectory (deterministic ones) or ends with
    its last step onto x̂0 = x0 (stochastic ones): the loop returns x0."""
    if cls in (DDIMScheduler, DDPMScheduler):
        kwargs = {**kwargs, "clip_sample": False}
    scheduler = cls(prediction_type=prediction_type, **kwargs)
    x0, eps = torch.rand(SHAPE) * 1.6 - 0.8, torch.randn(SHAPE)
    scheduler.set_timesteps(12)
    x_T = scheduler.add_noise(x0, eps, scheduler.timesteps[0])  # VP: √ᾱ·x0 + √(1 − ᾱ)·ε; VE: x0 + σ·ε
    out = _run(scheduler, 12, _oracle_model(scheduler, x0, eps), x=x_T, generator=torch.Generator().manual_seed(0),
               step_kwargs=step_kwargs)
    assert_rel_close(out, x0, 2e-5, f"{cls.__name__} final sample vs x0")


# --------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_guidance_scale_combines_uncond_and_cond(cls):
    """step(guidance_scale=s) on [uncond; cond] equals step on uncond + s·(cond − uncond) (fused for DDIM/DDPM)."""
    a, b = cls(), cls()
    a.set_timesteps(6), b.set_timesteps(6)
    x = torch.randn(SHAPE) * a.init_noise_sigma
    uncond, cond = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in a.timesteps[:3]:
        out_a = a.step(torch.cat([uncond, cond]), t, x, guidance_scale=3.5, generator=torch.Generator().manual_seed(1))
        out_b = b.step(uncond + 3.5 * (cond - uncond), t, x, generator=torch.Generator().manual_seed(1))
        assert_rel_close(out_a.prev_sample, out_b.prev_sample, 1e-6, "guided step")
        x = out_a.prev_sample


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_ddim_ddpm_steps_run_through_the_fused_ops(cls):
    s = cls()
    s.set_timesteps(4)
    fastdiff.reset_counts()
    s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))
    op = "ddim_step" if cls is DDIMScheduler else "ddpm_step"
    assert sum(v for (name, _), v in fastdiff.counts().items() if name == op) == 1


# --------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_step_api(cls):
    """int and tensor timesteps give the same step; return_dict=False gives a tuple; the output indexes."""
    results = []
    for as_int in (False, True):
        s = cls()
        s.set_timesteps(5)
        t = s.timesteps[0]
        t = int(t) if as_int else t
        x = torch.ones(SHAPE)
        out = s.step(torch.full(SHAPE, 0.3), t, x, generator=torch.Generator().manual_seed(0))
        assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == SHAPE
        assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample
        results.append(out.prev_sample)
    assert torch.equal(results[0], results[1])
    s = cls()
    s.set_timesteps(5)
    tup = s.step(torch.full(SHAPE, 0.3), s.timesteps[0], torch.ones(SHAPE), return_dict=False)
    assert isinstance(tup, tuple) and torch.is_tensor(tup[0])
    assert len(s) == 1000 and s.order == 1


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_samples(cls, dtype):
    """fp16/bf16 in → the same dtype out, close to the fp32 loop (the update itself runs in fp32)."""
    model = lambda xi, t, x: torch.tanh(xi)
    ref = _run(cls(), 6, model, generator=torch.Generator().manual_seed(0))
    s = cls()
    s.set_timesteps(6)
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)) * s.init_noise_sigma).to(dtype)
    out = _run(s, 6, model, x=x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    assert_rel_close(out.float(), ref, 3e-2, f"{cls.__name__} {dtype}")


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("n", [1, 1000])
def test_one_step_and_all_train_timesteps_work(cls, n):
    s = cls()
    s.set_timesteps(n)
    assert len(s.timesteps) == n
    steps = s.timesteps if n == 1 else s.timesteps[-3:]  # the end of a 1000-step chain: the hard part
    if n > 1 and cls in SIGMA_BASED:
        s.set_begin_index(n - 3)
    x = torch.randn(SHAPE)
    for t in steps:
        x = s.step(torch.tanh(s.scale_model_input(x, t)), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()


def test_num_inference_steps_equal_to_small_train_chain_full_loop():
    """n = T end to end (T = 50), every scheduler; DPM-Solver sees repeated timesteps there and must stay finite."""
    for cls in ALL:
        s = cls(num_train_timesteps=50)
        out = _run(s, 50, lambda xi, t, x: 0.5 * torch.tanh(xi), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all(), cls.__name__


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("bad", [0, -3, 2.5, 10.0, 1001, True, "10", None])
def test_bad_num_inference_steps(cls, bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(bad)


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler], ids=["ddim", "dpm"])
def test_step_before_set_timesteps(cls):
    """DDIM and DPM-Solver need set_timesteps first (as in diffusers); DDPM and Euler run on the training chain
    before it (tests/test_schedulers_conformance.py)."""
    s = cls()
    with pytest.raises(TimestepsNotSetError, match="set_timesteps"):
        s.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    assert issubclass(TimestepsNotSetError, RuntimeError) and issubclass(TimestepsNotSetError, ValueError)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("arg, value", [
    ("beta_schedule", "sigmoid"), ("beta_schedule", "cosine"), ("prediction_type", "flow_prediction"),
    ("prediction_type", "noise"), ("timestep_spacing", "uniform"), ("num_train_timesteps", 0),
    ("steps_offset", -1),
])
def test_bad_constructor_values(cls, arg, value):
    with pytest.raises(ValueError, match=arg):
        cls(**{arg: value})


@pytest.mark.parametrize("cls, arg, value", [
    (DDPMScheduler, "variance_type", "learned_ranged"),
    (DDPMScheduler, "variance_type", "small"),
    (DDPMScheduler, "clip_sample_range", 0.0),
    (DDIMScheduler, "clip_sample_range", -1.0),
    (DPMSolverMultistepScheduler, "solver_order", 4),
    (DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver+"),
    (DPMSolverMultistepScheduler, "solver_type", "bh3"),
    (DPMSolverMultistepScheduler, "final_sigmas_type", "one"),
    (EulerDiscreteScheduler, "final_sigmas_type", "min"),
    (EulerDiscreteScheduler, "sigma_min", -1.0),
    (DDIMScheduler, "trained_betas", [0.1, 0.2]),  # not num_train_timesteps values
])
def test_bad_scheduler_specific_values(cls, arg, value):
    with pytest.raises(ValueError, match=arg):
        cls(**{arg: value})


@pytest.mark.parametrize("cls, arg, value", [
    (DDIMScheduler, "clip_sample", "yes"), (DPMSolverMultistepScheduler, "use_karras_sigmas", 1),
    (DDPMScheduler, "beta_start", "0.1"),
])
def test_wrong_types_name_the_argument(cls, arg, value):
    with pytest.raises(TypeError, match=arg):
        cls(**{arg: value})


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_unknown_keyword_is_a_type_error(cls):
    with pytest.raises(TypeError, match="beta_shedule"):
        cls(beta_shedule="linear")
    cls(_class_name="X", _diffusers_version="0.42.1")  # private keys, as diffusers passes them, are ignored


@pytest.mark.parametrize("cls, key, default, bad", [
    (DPMSolverMultistepScheduler, "variance_type", None, "learned_range"),
    (DPMSolverMultistepScheduler, "use_flow_sigmas", False, True),
    (DPMSolverMultistepScheduler, "use_dynamic_shifting", False, True),
])
def test_unsupported_diffusers_options(cls, key, default, bad, caplog):
    """Accepted at diffusers' default (ignored with a debug log), a clear ValueError otherwise."""
    with caplog.at_level(logging.DEBUG, logger="fastdiff.schedulers"):
        cls.from_config({key: default, "_class_name": "Whatever", "_diffusers_version": "0.42.1", "not_ours": 3})
        cls(**{key: default})
    assert any(key in r.getMessage() for r in caplog.records)
    assert any("not_ours" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=key):
        cls.from_config({key: bad})
    with pytest.raises(ValueError, match=key):
        cls(**{key: bad})


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_bad_step_inputs(cls):
    s = cls()
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(3, 3, 4, 4), t, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE), guidance_scale=2.0)  # needs (2B, ...)
    with pytest.raises(TypeError):
        s.step([0.0], t, torch.zeros(SHAPE))


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_bad_add_noise_inputs(cls):
    s = cls()
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        s.add_noise(x, torch.zeros(1, 3, 4, 4), s.timesteps[:2])
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(x, x, torch.tensor([1000, 5]) if cls in (DDIMScheduler, DDPMScheduler) else torch.tensor([7, 9]))


@pytest.mark.parametrize("cls", SIGMA_BASED, ids=[c.__name__ for c in SIGMA_BASED])
def test_timestep_not_in_schedule(cls):
    s = cls()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        s.step(torch.zeros(SHAPE), 123, torch.zeros(SHAPE))


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_timestep_out_of_range(cls):
    s = cls()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.zeros(SHAPE), 1000, torch.zeros(SHAPE))


def test_steps_past_the_end_are_an_error():
    s = EulerDiscreteScheduler()
    s.set_timesteps(2)
    for t in s.timesteps:
        s.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE))
    with pytest.raises(RuntimeError, match="steps are done"):
        s.step(torch.zeros(SHAPE), s.timesteps[-1], torch.zeros(SHAPE))


def test_ddim_noise_sources_are_exclusive():
    s = DDIMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        s.step(torch.zeros(SHAPE), 800, torch.zeros(SHAPE), eta=1.0, generator=torch.Generator(),
               variance_noise=torch.zeros(SHAPE))


def test_custom_timesteps_and_sigmas():
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(timesteps=[900, 500, 100, 0])
    assert ddpm.timesteps.tolist() == [900, 500, 100, 0] and ddpm.previous_timestep(500) == 100
    with pytest.raises(ValueError, match="descending"):
        ddpm.set_timesteps(timesteps=[100, 500])
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(sigmas=[10.0, 1.0, 0.1, 0.0])
    assert euler.sigmas.tolist() == pytest.approx([10.0, 1.0, 0.1, 0.0]) and len(euler.timesteps) == 3
    with pytest.raises(ValueError, match="exactly one"):
        euler.set_timesteps(5, timesteps=[900, 100])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100])


CUSTOM = [DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]  # the ones that take timesteps=


@pytest.mark.parametrize("cls", CUSTOM, ids=[c.__name__ for c in CUSTOM])
@pytest.mark.parametrize("bad", [[], [100, 500], [500, 500, 100], [1000, 10], [10, -1], [[900, 100]],
                                 [900.0, float("nan")], ["a", "b"]])
def test_custom_timesteps_are_checked_alike(cls, bad):
    """One rule for every scheduler that takes custom timesteps: non-empty, strictly descending, in [0, T − 1]."""
    s = cls()
    s.set_timesteps(5)
    before = s.timesteps.clone()
    with pytest.raises(ValueError, match="timesteps must be"):
        s.set_timesteps(timesteps=bad)
    assert torch.equal(s.timesteps, before)  # a refused schedule leaves the old one in place
    s.set_timesteps(timesteps=torch.tensor([999, 500, 0]))  # a tensor works, and T − 1 and 0 are in range
    assert s.timesteps.tolist() == [999, 500, 0] and s.num_inference_steps == 3


@pytest.mark.parametrize("cls", CUSTOM, ids=[c.__name__ for c in CUSTOM])
def test_schedule_chosen_by_exactly_one_argument(cls):
    s = cls()
    for kwargs in ({}, {"num_inference_steps": 5, "timesteps": [900, 100]}):
        with pytest.raises(ValueError, match="exactly one of num_inference_steps"):
            s.set_timesteps(**kwargs)
    assert s.num_inference_steps is None


def test_ddpm_custom_timesteps_flag_follows_the_schedule_in_use():
    s = DDPMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[1, 2])
    assert s.custom_timesteps is False and len(s.timesteps) == 5
    s.set_timesteps(timesteps=[900, 1])
    assert s.custom_timesteps is True
    s.set_timesteps(5)
    assert s.custom_timesteps is False


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_steps_offset_past_the_chain_is_an_error(cls):
    """leading spacing: t_i = i·⌊T/n⌋ + steps_offset (DPM-Solver: n + 1 points, the smallest dropped) must stay < T."""
    s = cls(num_train_timesteps=10, timestep_spacing="leading", steps_offset=5)
    with pytest.raises(ValueError, match=r"steps_offset=5 puts timestep 1[13] outside \[0, 10\)"):
        s.set_timesteps(4)
    s = cls(num_train_timesteps=10, timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(4)  # the first timestep is 7 (9 for DPM-Solver): fine
    assert max(s.timesteps.tolist()) == (9 if cls is DPMSolverMultistepScheduler else 7)


# --------------------------------------------------------------------------------------------- config
def test_settings_are_a_small_frozen_dataclass_not_a_dict():
    s = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=np.int64(1), clip_sample=np.bool_(False))
    settings = s.settings
    assert dataclasses.is_dataclass(settings) and not isinstance(settings, (dict, Mapping))
    assert settings.beta_schedule == "scaled_linear" and settings.steps_offset == 1
    assert type(settings.steps_offset) is int and type(settings.clip_sample) is bool  # numpy values normalized
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps_offset = 2
    assert not any(hasattr(settings, name) for name in ("__setitem__", "update", "pop", "clear"))
    assert hash(settings) == hash(DDIMScheduler(**s.config).settings) and DDIMScheduler(**s.config).settings == settings
    for again in (pickle.loads(pickle.dumps(settings)), copy.copy(settings), copy.deepcopy(settings)):
        assert type(again) is type(settings) and again == settings
    clone = copy.deepcopy(s)
    assert clone.settings == settings and torch.equal(clone.alphas_cumprod, s.alphas_cumprod)
    assert DDIMScheduler.from_config(settings).settings == settings  # from_config takes the dataclass too
    json.dumps(s.config)  # a config made from numpy values saves as JSON


def test_config_is_a_diffusers_shaped_dict_copy():
    s = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    cfg = s.config
    assert type(cfg) is ConfigDict and isinstance(cfg, dict)  # diffusers' from_config wants a dict instance
    assert cfg.beta_schedule == "scaled_linear" and cfg["steps_offset"] == 1 and cfg.get("nope", 7) == 7
    assert "clip_sample" in cfg and "solver_order" not in cfg and not hasattr(cfg, "solver_order")
    with pytest.raises(AttributeError, match="solver_order"):
        cfg.solver_order
    with pytest.raises(KeyError):
        cfg["solver_order"]
    d = dict(cfg)
    assert d["set_alpha_to_one"] is True
    assert set(d) - {"_use_default_values"} == {f.name for f in dataclasses.fields(s.settings)}
    # the fields left at their defaults, under diffusers' key
    assert "clip_sample" in d["_use_default_values"] and "steps_offset" not in d["_use_default_values"]
    assert DDIMScheduler(**cfg).config == cfg and {**cfg}["beta_schedule"] == "scaled_linear"
    # a copy: changing it changes nothing in the scheduler
    cfg["steps_offset"] = 5
    cfg.update(beta_schedule="linear")
    assert s.settings.steps_offset == 1 and s.config.steps_offset == 1 and s.config.beta_schedule == "scaled_linear"
    assert s.config is not s.config and s.config == s.config
    again = pickle.loads(pickle.dumps(s.config))
    assert type(again) is ConfigDict and again == s.config and again.steps_offset == 1


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_save_config_round_trip(cls, tmp_path):
    kwargs = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                  "num_train_timesteps": 10, "trained_betas": [0.01 * (i + 1) for i in range(10)]}
    s = cls(**kwargs)
    path = s.save_config(tmp_path)
    with open(path) as f:
        data = json.load(f)
    assert data["_class_name"] == cls.__name__ and data["trained_betas"][0] == 0.01
    for source in (tmp_path, path, str(tmp_path)):
        assert cls.from_config(source).settings == s.settings
    assert cls.from_pretrained(tmp_path).settings == s.settings
    pipeline_root = tmp_path / "pipe"
    s.save_config(pipeline_root / "scheduler")  # a diffusers pipeline folder: scheduler/scheduler_config.json
    assert cls.from_config(pipeline_root).settings == s.settings
    assert cls.from_config(s.config, prediction_type="epsilon").config.prediction_type == "epsilon"
    with pytest.raises(FileNotFoundError):
        cls.from_config(tmp_path / "missing")


def test_from_config_across_schedulers_keeps_shared_fields():
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         clip_sample=False)
    dpm = DPMSolverMultistepScheduler.from_config(ddim.config, use_karras_sigmas=True)
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.steps_offset == 1
    assert dpm.config.use_karras_sigmas and torch.equal(dpm.betas, ddim.betas)
    defaulted = {**dict(ddim.config), "_use_default_values": ["timestep_spacing"]}
    assert EulerDiscreteScheduler.from_config(defaulted).config.timestep_spacing == "linspace"  # Euler's default


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_config_mapping_protocol_and_copies(cls):
    s = cls(prediction_type="v_prediction")
    cfg = s.config
    assert isinstance(cfg, Mapping) and len(cfg) == len(s.settings.field_names()) + 1  # + "_use_default_values"
    assert list(cfg) == list(cfg.keys()) and list(cfg.values()) == [cfg[k] for k in cfg]
    assert dict(cfg.items()) == dict(cfg) and s.settings.to_dict() == {k: cfg[k] for k in s.settings.field_names()}
    assert "prediction_type" not in cfg["_use_default_values"] and "beta_start" in cfg["_use_default_values"]
    for again in (pickle.loads(pickle.dumps(cfg)), copy.copy(cfg), copy.deepcopy(cfg)):
        assert type(again) is type(cfg) and again == cfg and dict(again) == dict(cfg)
    again = pickle.loads(pickle.dumps(s))
    assert again.settings == s.settings and again.config == cfg
    assert s.settings != cls(prediction_type="sample").settings


def test_config_pickled_by_older_fastdiff_still_loads():
    """Configs were once dict subclasses pickled as _rebuild_config(cls, fields, defaulted), first in
    schedulers.base, then schedulers.config; schedulers held them as their ``config`` attribute."""
    from fastdiff.schedulers import config as config_module

    s = DDIMScheduler(steps_offset=1)

    class OldConfig:  # pickles exactly as the old dict-subclass config did
        def __reduce__(self):
            return config_module._rebuild_config, (type(s.settings), s.settings.to_dict(), ["beta_start"])

    new = pickle.dumps(OldConfig(), protocol=2)
    old = new.replace(b"cfastdiff.schedulers.config\n_rebuild_config\n",
                      b"cfastdiff.schedulers.base\n_rebuild_config\n")
    assert old != new
    for data in (new, old):
        assert pickle.loads(data) == s.settings
    legacy = DDIMScheduler.__new__(DDIMScheduler)
    state = {k: v for k, v in s.__dict__.items() if k not in ("settings", "_defaulted")}
    legacy.__setstate__({**state, "config": pickle.loads(old)})
    assert legacy.settings == s.settings and legacy.config.steps_offset == 1 and "config" not in legacy.__dict__
    assert legacy.config["_use_default_values"] == ["beta_start"]  # what the old pickle said was defaulted
