"""The fused path covers every scheduler (issue 17, point 3): each step() on a batch is exactly one fused op call
(``linear_step`` for the σ-space, multistep and consistency samplers, ``ddim_step`` / ``ddpm_step`` for DDIM / DDPM),
classifier-free guidance included, and the whole loop through the Triton kernels (the interpreter here, compiled on
CUDA) equals the loop on the torch path. The two paths run in lockstep on the same sample so that 1-ulp differences
do not compound through solvers that amplify them.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from step_cases import kernel_path
from utils import assert_rel_close

import fastdiff
import fastdiff.schedulers as fs

SHAPE = (2, 3, 5, 7)  # 210 elements: several interpreter blocks, a ragged last one
CASES = [
    ("DDIMScheduler", {}, {"eta": 0.5}, "ddim_step"),
    ("DDPMScheduler", {}, {}, "ddpm_step"),
    ("DPMSolverMultistepScheduler", {}, {}, "linear_step"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {}, "linear_step"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {},
     "linear_step"),
    # dynamic thresholding's per-sample quantile is the reference's torch code: one call, on the torch path
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "thresholding": True}, {}, "linear_step/torch"),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, {"s_churn": 1.0}, "linear_step"),
    ("EulerAncestralDiscreteScheduler", {}, {}, "linear_step"),
    ("LCMScheduler", {}, {}, "linear_step"),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}, "linear_step"),
    ("HeunDiscreteScheduler", {}, {}, "linear_step"),
    ("KDPM2DiscreteScheduler", {}, {}, "linear_step"),
    ("LMSDiscreteScheduler", {}, {}, "linear_step"),
    ("PNDMScheduler", {}, {}, "linear_step"),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}, {}, "linear_step"),
    ("DEISMultistepScheduler", {"solver_order": 3}, {}, "linear_step"),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 3}, {}, "linear_step"),
]


def model(x, t):
    phase = torch.linspace(0, 3, x[0].numel(), device=x.device).reshape(x.shape[1:])
    cond = 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)
    return torch.cat([0.5 * cond, cond])  # [uncond; cond]


@pytest.mark.parametrize("name, config, step_kwargs, op", CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_one_fused_call_per_step_matching_the_torch_path(device, monkeypatch, name, config, step_kwargs, op):
    if not hasattr(fs, name):
        pytest.fail(f"fastdiff.schedulers has no {name}")
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")  # the sde extra
    torch_path, fused_path = getattr(fs, name)(**config), getattr(fs, name)(**config)
    for s in (torch_path, fused_path):
        s.set_timesteps(6)
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(torch_path.init_noise_sigma)).to(device)
    g_torch, g_fused = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    if "generator" not in inspect.signature(torch_path.step).parameters:  # LMS, PNDM: no noise, no generator
        g_torch = g_fused = None
    steps = 0
    for t in torch_path.timesteps:
        model_output = model(torch_path.scale_model_input(x, t), t)
        fused_path.scale_model_input(x, t)
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
        want = torch_path.step(model_output, t, x, guidance_scale=4.0, **step_kwargs,
                               **({"generator": g_torch} if g_torch is not None else {}))
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
        fastdiff.reset_counts()
        got = fused_path.step(model_output, t, x, guidance_scale=4.0, **step_kwargs,
                              **({"generator": g_fused} if g_fused is not None else {}))
        op_name, _, path = op.partition("/")
        assert fastdiff.counts() == {(op_name, path or kernel_path(device)): 1}, f"step {steps}: {fastdiff.counts()}"
        assert list(got.keys()) == list(want.keys())
        for key in want.keys():
            # compiled CUDA code contracts a·x + b·y into FMAs (the interpreter and torch round each product)
            assert_rel_close(got[key], want[key], 1e-6 if device.type == "cpu" else 1e-5, f"{name} step {steps} {key}")
        x = want.prev_sample
        steps += 1
    assert steps == len(torch_path.timesteps)
