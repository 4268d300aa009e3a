"""What the fused DDIM and DDPM step kernels share (``kernels/ddim_step.py``, ``kernels/ddpm_step.py``).

Device helpers (``@triton.jit``: offsets and the per-sample layout, the guided model output, ᾱ roots, x0/ε from the
prediction type, clipping, storing x_{t-1} and x0) and the host side (coefficients, block size, the launch).

Alphas: Python floats → the per-step coefficients are computed on the host in float64 and passed as scalars, and the
grid is flat over all elements. Per-sample (B,) fp32 tensors → the grid is (B, chunks of one sample): every program
loads its sample's ᾱ_t and ᾱ_prev once (scalar loads) and computes the coefficients on chip, so the values never
travel to the host (no device sync).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdiff.kernels import target
from fastdiff.validation import PREDICTION_TYPES, VARIANCE_TYPES  # the one home of the vocabularies

PREDICTION_CODES = {name: i for i, name in enumerate(PREDICTION_TYPES)}  # the kernels' constexpr codes
VARIANCE_CODES = {name: i for i, name in enumerate(VARIANCE_TYPES)}


# --------------------------------------------------------------------------------------------- device helpers
@triton.jit
def step_offsets(
    n_elements,  # B * per_sample_numel
    per_sample_numel,  # elements of one sample
    PER_SAMPLE_ALPHA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Flat grid: program i covers [i·BLOCK, (i+1)·BLOCK). Per-sample grid (B, chunks): one chunk of one sample."""
    if PER_SAMPLE_ALPHA:
        sample_idx = tl.program_id(0)
        local = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = local < per_sample_numel
        offs = sample_idx.to(tl.int64) * per_sample_numel + local
    else:
        sample_idx = 0
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
    return offs, mask, sample_idx


@triton.jit
def guided_model_output(
    M,  # (N,) model output, or (2N,) = [uncond; cond] with HAS_GUIDANCE
    offs,
    mask,
    n_elements,  # N
    guidance_scale,
    HAS_GUIDANCE: tl.constexpr,
):
    """Load the model output in fp32; with guidance, uncond + s·(cond − uncond) in registers."""
    out = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GUIDANCE:
        cond = tl.load(M + n_elements + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + guidance_scale * (cond - out)
    return out


@triton.jit
def _alpha_roots(alpha_prod_t):
    """sqrt(ᾱ_t), sqrt(1 − ᾱ_t) and their reciprocals (IEEE-rounded: computed once per program)."""
    sqrt_alpha = tl.sqrt_rn(alpha_prod_t)
    sqrt_beta = tl.sqrt_rn(1.0 - alpha_prod_t)
    return sqrt_alpha, sqrt_beta, tl.div_rn(1.0, sqrt_alpha), tl.div_rn(1.0, sqrt_beta)


@triton.jit
def _x0_and_eps(
    x,  # x_t, fp32
    out,  # (guided) model output, fp32
    sqrt_alpha,  # sqrt(ᾱ_t)
    sqrt_beta,  # sqrt(1 − ᾱ_t)
    inv_sqrt_alpha,
    inv_sqrt_beta,
    PREDICTION_TYPE: tl.constexpr,  # 0 epsilon, 1 sample, 2 v_prediction
):
    """Predicted x0 and noise ε from x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε (v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0)."""
    if PREDICTION_TYPE == 0:
        x0 = (x - sqrt_beta * out) * inv_sqrt_alpha
        eps = out
    elif PREDICTION_TYPE == 1:
        x0 = out
        eps = (x - sqrt_alpha * out) * inv_sqrt_beta
    else:
        x0 = sqrt_alpha * x - sqrt_beta * out
        eps = sqrt_alpha * out + sqrt_beta * x
    return x0, eps


@triton.jit
def clip(x0, clip_range):
    """clamp(x0, −r, r), NaN propagating like torch.clamp."""
    x0 = tl.maximum(x0, -clip_range, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x0, clip_range, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_alphas(
    ALPHA_T,  # (B,) fp32 ᾱ_t
    ALPHA_PREV,  # (B,) fp32 ᾱ_prev
    sample_idx,
):
    """This program's ᾱ_t and ᾱ_prev (two scalar loads), and sqrt(ᾱ_t), sqrt(1 − ᾱ_t) and their reciprocals."""
    alpha_t = tl.load(ALPHA_T + sample_idx)
    alpha_prev = tl.load(ALPHA_PREV + sample_idx)
    sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta = _alpha_roots(alpha_t)
    return alpha_t, alpha_prev, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta


@triton.jit
def predict_x0(
    X,  # (N,) sample x_t
    M,  # (N,) model output, or (2N,) = [uncond; cond] with HAS_GUIDANCE
    offs,
    mask,
    n_elements,  # N
    sqrt_alpha,
    sqrt_beta,
    inv_sqrt_alpha,
    inv_sqrt_beta,
    guidance_scale,
    clip_range,
    PREDICTION_TYPE: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    CLIP: tl.constexpr,
):
    """x_t in fp32, the predicted x0 from the (guided) model output (clipped with CLIP), and ε from the unclipped x0."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    out = guided_model_output(M, offs, mask, n_elements, guidance_scale, HAS_GUIDANCE)
    x0, eps = _x0_and_eps(x, out, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta, PREDICTION_TYPE)
    if CLIP:
        x0 = clip(x0, clip_range)
    return x, x0, eps


@triton.jit
def store_step(
    PREV,  # (N,) out: x_{t-1}
    X0,  # (N,) out: predicted x0
    Z,  # (N,) noise z (read with HAS_NOISE only)
    offs,
    mask,
    prev,  # x_{t-1} before the noise, fp32
    x0,
    std_dev,  # σ_t
    HAS_NOISE: tl.constexpr,
):
    """x_{t-1} (+ σ_t·z with HAS_NOISE) and x0, stored in the outputs' dtype."""
    if HAS_NOISE:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        prev = prev + std_dev * z
    tl.store(PREV + offs, prev.to(PREV.dtype.element_ty), mask=mask)
    tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- host side
def sqrt_host(value: float) -> float:
    """math.sqrt that gives NaN for a negative argument, as the tensor path does (an ill-posed η or ᾱ order)."""
    return math.sqrt(value) if value >= 0.0 else math.nan


def alpha_roots_host(alpha_prod_t: float) -> tuple[float, float, float, float]:
    sqrt_alpha, sqrt_beta = sqrt_host(alpha_prod_t), sqrt_host(1.0 - alpha_prod_t)
    return sqrt_alpha, sqrt_beta, 1.0 / sqrt_alpha, 1.0 / sqrt_beta


# an explicit register budget: without one, the ptxas of Triton 3.6 (CUDA 12.8) aims at 32 registers for some step
# variants and spills 4 B; the kernels need at most 46 (docs/kernels.md). Ignored by the interpreter.
MAXNREG = 64


def block_size(n_elements: int, sample: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps). Interpreter: small blocks, so small test tensors span several programs."""
    if not target.compiled_gpu(sample):
        return 128, 1
    if n_elements <= (1 << 21):
        return 1024, 4
    return 4096, 8


def launch(kernel, sample, model_output, noise, alpha_prod_t, alpha_prod_t_prev, scalars, **constexprs):
    """Allocate (prev_sample, pred_original_sample), pick the layout (flat, or per-sample when an alpha is a tensor)
    and the block size, and launch once; returns the two outputs."""
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample)
    n_elements = sample.numel()
    if n_elements == 0:
        return prev, x0
    batch = sample.shape[0]
    per_sample_numel = n_elements // batch
    block, num_warps = block_size(n_elements, sample)
    per_sample_alpha = isinstance(alpha_prod_t, torch.Tensor) or isinstance(alpha_prod_t_prev, torch.Tensor)
    if per_sample_alpha:
        # a float next to a tensor becomes a (B,) tensor too (a fill, no host sync)
        alpha_t, alpha_prev = (
            a if isinstance(a, torch.Tensor) else torch.full((batch,), a, dtype=torch.float32, device=sample.device)
            for a in (alpha_prod_t, alpha_prod_t_prev)
        )
        block = max(32, min(block, triton.next_power_of_2(per_sample_numel)))
        num_warps = min(num_warps, max(1, block // 256))  # small samples: fewer warps per (smaller) program
        grid = (batch, triton.cdiv(per_sample_numel, block))
        if grid[1] > target.MAX_GRID_Y:  # axis 1: chunks of one sample in the per-sample layout
            raise ValueError(f"sample has {per_sample_numel} elements per batch entry; the per-sample-alpha kernel "
                             f"handles at most {target.MAX_GRID_Y * block}")
    else:
        alpha_t = alpha_prev = sample  # placeholders, never read
        grid = (triton.cdiv(n_elements, block),)
    target.launcher(kernel, sample)[grid](
        sample, model_output, noise if noise is not None else sample, alpha_t, alpha_prev, prev, x0,
        n_elements, per_sample_numel, *scalars,
        PER_SAMPLE_ALPHA=per_sample_alpha, BLOCK_SIZE=block, num_warps=num_warps, **constexprs,
        **target.register_cap(sample, MAXNREG),
    )
    return prev, x0


def float_alphas(alpha_prod_t, alpha_prod_t_prev) -> tuple[float, float] | None:
    """(ᾱ_t, ᾱ_prev) as floats when both are numbers (coefficients on the host); None when either is a (B,) tensor
    (coefficients on chip)."""
    if isinstance(alpha_prod_t, torch.Tensor) or isinstance(alpha_prod_t_prev, torch.Tensor):
        return None
    return float(alpha_prod_t), float(alpha_prod_t_prev)


