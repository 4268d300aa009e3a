"""What the fused-step tests (test_ddim_step.py, test_ddpm_step.py) share: the cases (prediction types, shapes,
dtypes), fresh random inputs, the naive float64 x0/ε solve, and the checks whose bodies are the same for
``fastdiff.ops.ddim_step`` and ``ddpm_step``. Each check takes the op under test; the tests and their
parametrisations stay in the two test files.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from utils import assert_rel_close, poison_empty

import fastdiff

PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
SHAPES = [
    (1, 4, 8, 8),  # B=1
    (3, 4, 9, 11),  # numel 1188, not a multiple of the block
    (2, 1, 16, 16),  # pixel space, exact multiple of the block
    (5, 7),  # 2-D toy data: 7 elements per sample
]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def kernel_path(device: torch.device) -> str:
    """The path fastdiff.counts() records for the Triton kernel on device."""
    return "triton" if device.type == "cuda" else "interpreter"


def skip_if_no_kernels(backend: str) -> None:
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")


def step_inputs(shape, dtype, device, *, guidance, per_sample, seed=0):
    """Fresh random x_t, model output ((2B, ...) with guidance), noise and alphas with ᾱ_prev > ᾱ_t."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    out = torch.randn((2 * b if guidance else b, *shape[1:]), generator=g).to(dtype=dtype, device=device)
    noise = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    if per_sample:
        a_t = (0.05 + 0.8 * torch.rand(b, generator=g)).to(device)
        a_prev = (a_t + (0.99 - a_t) * torch.rand(b, generator=g)).to(device)
    else:
        a_t, a_prev = 0.3, 0.75
    return x, out, noise, a_t, a_prev


# --------------------------------------------------------------------------------------------- naive oracle
def naive_x0_eps(x, out, a_t, prediction_type, clip, guidance_scale):
    """x0 (clamped to [−clip, clip] unless clip is None) and ε (from the unclipped x0), float64, x's shape: solved
    per sample from the forward model x_t = α·x0 + σ·ε, written fresh (not taken from fastdiff.reference)."""
    x, out = x.double(), out.double()
    b = x.shape[0]
    if guidance_scale is not None:  # classifier-free guidance: ε̂ = ε(∅) + s·(ε(c) − ε(∅))
        out = out[:b] + guidance_scale * (out[b:] - out[:b])
    a_t = torch.as_tensor(a_t, dtype=torch.float64).expand(b)
    x0, eps = torch.empty_like(x), torch.empty_like(x)
    for i in range(b):
        alpha, sigma = math.sqrt(a_t[i]), math.sqrt(1 - a_t[i])
        # unknowns (x0, ε): x_t = α·x0 + σ·ε, plus what the network predicts (ε, x0, or v = α·ε − σ·x0)
        second = {"epsilon": [0.0, 1.0], "sample": [1.0, 0.0], "v_prediction": [-sigma, alpha]}[prediction_type]
        system = torch.tensor([[alpha, sigma], second], dtype=torch.float64)
        x0_i, eps_i = torch.linalg.solve(system, torch.stack([x[i].flatten(), out[i].flatten()]))
        x0[i], eps[i] = x0_i.view(x.shape[1:]), eps_i.view(x.shape[1:])
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return x0, eps


# --------------------------------------------------------------------------------------------- checks
def check_kernel_matches_reference(op, monkeypatch, x, out, a_t, a_prev, tol=1e-5, **kwargs):
    """op on the reference path, then the Triton kernel into poisoned outputs (dispatch counts reset first): both
    outputs within tol of the reference. Returns the kernel's (prev_sample, pred_original_sample)."""
    ref_prev, ref_x0 = op(x, out, a_t, a_prev, backend="torch", **kwargs)
    poison_empty(monkeypatch)
    fastdiff.reset_counts()
    prev, x0 = op(x, out, a_t, a_prev, backend="triton", **kwargs)
    assert_rel_close(prev, ref_prev, tol, "prev_sample")
    assert_rel_close(x0, ref_x0, tol, "pred_original_sample")
    return prev, x0


def check_last_step_returns_x0(op, device, backend, per_sample, **kwargs):
    """ᾱ_prev = 1 (the last step) makes x_{t-1} = x0 (clipped to [−1, 1])."""
    skip_if_no_kernels(backend)
    x, out, noise, a_t, _ = step_inputs((2, 3, 5, 7), torch.float32, device, guidance=False, per_sample=per_sample)
    a_prev = torch.ones(2, device=device) if per_sample else 1.0
    prev, x0 = op(x, out, a_t, a_prev, noise=noise, clip_sample_range=1.0, backend=backend, **kwargs)
    assert_rel_close(prev, x0, 1e-6, "prev_sample vs pred_original_sample")
    assert x0.abs().max() <= 1.0


def check_kernel_does_not_read_tensor_alphas(op, device, monkeypatch, **kwargs):
    """With (B,) alphas the kernel path reads no tensor value on the host (and, on CUDA, does not sync)."""
    x, out, noise, a_t, a_prev = step_inputs((2, 3, 5, 7), torch.float32, device, guidance=True, per_sample=True)
    ref_prev, _ = op(x, out, a_t, a_prev, noise=noise, guidance_scale=2.0, backend="torch", **kwargs)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        prev, _ = op(x, out, a_t, a_prev, noise=noise, guidance_scale=2.0, backend="triton", **kwargs)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert_rel_close(prev, ref_prev, 1e-5, "prev_sample")


def good_step_args() -> dict:
    x = torch.randn(2, 3, 4, 4)
    return {"sample": x, "model_output": torch.randn_like(x), "alpha_prod_t": 0.5, "alpha_prod_t_prev": 0.8}


def check_bad_input(op, change, error, match) -> None:
    """good_step_args() with ``change`` applied raises error (matching match) before any work is dispatched."""
    args = {**good_step_args(), **change}
    fastdiff.reset_counts()
    with pytest.raises(error, match=match):
        op(**args)
    assert fastdiff.counts() == {}, "bad input must be rejected before any work"
