"""Plain PyTorch for every fastdiff op: the CPU fallback users run and the oracle every kernel is tested against.

Inputs are assumed valid (``fastdiff.ops`` validates). Low-precision inputs are computed in fp32 and the
result is cast back, as the kernels do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Alpha = float | torch.Tensor


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """GroupNorm over (C/G, *spatial) per (n, g), affine per channel, then SiLU. x: (N, C, *spatial)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    if x.is_contiguous():
        xf = x.float() if low else x
    else:
        # channels_last: torch's CPU kernel forms E[x²] − E[x]² in fp32, which cancels when |mean| ≫ std (x = 100 +
        # randn loses 3 digits, 1000 + randn all of them). GroupNorm ignores a per-group constant, so subtract one:
        # the group's mean at the first pixel (the fp32 result doubles as the upcast of fp16/bf16).
        n, c = x.shape[:2]
        first = x[(slice(None), slice(None)) + (0,) * (x.ndim - 2)].float()  # (N, C)
        pivot = first.reshape(n, num_groups, -1).mean(2, keepdim=True).expand(n, num_groups, c // num_groups)
        xf = x - pivot.reshape(n, c, *([1] * (x.ndim - 2)))  # fp32, channels_last
    w = weight.float() if (low and weight is not None) else weight
    b = bias.float() if (low and bias is not None) else bias
    # torch.group_norm, not F.group_norm: the functional refuses groups of one element (N·(C/G)·HW = 1), where the
    # kernels (and the definition: variance 0, x − mean = 0) give the bias
    y = torch.group_norm(xf, num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y, inplace=True)
    return _memory_format_of(x, y.to(x.dtype) if low else y)


def _memory_format_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format (what the kernels promise): contiguous where x is, else channels_last where x
    is (torch's own ops may pick another layout when size-1 dims carry unusual strides, or follow the weight's)."""
    if x.is_contiguous():
        return y.contiguous()
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1. x: (N, C, H, W), weight: (K, C, 3, 3), bias: (K,) (fp32 or x's
    dtype, used in x's) → (N, K, H, W)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _memory_format_of(x, F.conv2d(x, weight, bias, padding=1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v. q: (B, H, N, D); k, v: (B, H, M, D) → (B, H, N, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _per_sample(alpha: Alpha, ndim: int) -> Alpha:
    """A float stays a float; a (B,) tensor becomes (B, 1, ..., 1) fp32 to broadcast over a sample."""
    if isinstance(alpha, torch.Tensor):
        return alpha.float().reshape(-1, *([1] * (ndim - 1)))
    return float(alpha)


def _sqrt(a: Alpha) -> Alpha:
    """Square root of a tensor or a float; a negative float (an ill-posed η or ᾱ order) gives NaN, as a tensor does."""
    if isinstance(a, torch.Tensor):
        return a.sqrt()
    return math.sqrt(a) if a >= 0 else math.nan


def classifier_free_guidance(model_output: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance: model_output = [uncond; cond] (2B, ...) → uncond + s·(cond − uncond) (B, ...)."""
    if guidance_scale is None:
        return model_output
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _bound_x0(x0, clip_sample_range, threshold):
    """Dynamic thresholding when ``threshold`` is given (it takes precedence, as in diffusers), else the clamp."""
    if threshold is not None:
        return dynamic_threshold(x0, *threshold)
    return x0.clamp(-clip_sample_range, clip_sample_range)


def _x0_and_eps(x, out, alpha_prod_t, prediction_type):
    """Predicted x0 and noise from the model output, for each prediction type."""
    sqrt_a = _sqrt(alpha_prod_t)
    sqrt_b = _sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (x - sqrt_b * out) / sqrt_a, out
    if prediction_type == "sample":  # a copy: the op's outputs must never alias its inputs
        return out.clone(), (x - sqrt_a * out) / sqrt_b
    # v_prediction
    return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of a predicted x0 (Saharia et al. 2022, §2.3): per sample, s = the ``ratio`` quantile of
    |x0| over all its elements, clamped to [1, max_value]; x0 → clamp(x0, −s, s)/s. Computed in fp32 (or x0's
    float64), returned in x0's dtype."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t: Alpha,
    alpha_prod_t_prev: Alpha,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    guidance_scale: float | None = None,
    use_clipped_model_output: bool = False,
    threshold: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Song et al. 2021, eq. 12) → (prev_sample, pred_original_sample), both shaped like sample.

    ``threshold`` = (ratio, max_value): x0 dynamically thresholded (:func:`dynamic_threshold`) instead of clipped
    (the schedulers' ``thresholding`` option; the fused ops do not take it)."""
    dtype = sample.dtype
    x = sample.float()
    out = classifier_free_guidance(model_output.float(), guidance_scale)
    a_t = _per_sample(alpha_prod_t, x.ndim)
    a_prev = _per_sample(alpha_prod_t_prev, x.ndim)
    # 1. predicted x0 and noise
    x0, eps = _x0_and_eps(x, out, a_t, prediction_type)
    # 2. bound x0 (and re-derive the noise from the bounded x0 if asked)
    if threshold is not None or clip_sample_range is not None:
        x0 = _bound_x0(x0, clip_sample_range, threshold)
        if use_clipped_model_output:
            eps = (x - _sqrt(a_t) * x0) / _sqrt(1 - a_t)
    # 3. σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_dev_t = eta * _sqrt(variance)
    # 4. x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ_t²)·ε (+ σ_t·z)
    direction = _sqrt(1 - a_prev - std_dev_t**2) * eps
    prev = _sqrt(a_prev) * x0 + direction
    if eta > 0 and noise is not None:
        prev = prev + std_dev_t * noise.float()
    return prev.to(dtype), x0.to(dtype)


def ddpm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t: Alpha,
    alpha_prod_t_prev: Alpha,
    noise: torch.Tensor | None = None,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    guidance_scale: float | None = None,
    threshold: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM update (Ho et al. 2020, eq. 6–7) → (prev_sample, pred_original_sample); ``threshold`` as in
    :func:`ddim_step`."""
    dtype = sample.dtype
    x = sample.float()
    out = classifier_free_guidance(model_output.float(), guidance_scale)
    a_t = _per_sample(alpha_prod_t, x.ndim)
    a_prev = _per_sample(alpha_prod_t_prev, x.ndim)
    beta_prod_t = 1 - a_t
    beta_prod_t_prev = 1 - a_prev
    current_alpha_t = a_t / a_prev
    current_beta_t = 1 - current_alpha_t
    # 1. predicted x0
    x0, _ = _x0_and_eps(x, out, a_t, prediction_type)
    # 2. bound x0
    if threshold is not None or clip_sample_range is not None:
        x0 = _bound_x0(x0, clip_sample_range, threshold)
    # 3. posterior mean μ̃ = sqrt(ᾱ_prev)·β_t/(1 − ᾱ_t)·x0 + sqrt(α_t)·(1 − ᾱ_prev)/(1 − ᾱ_t)·x_t
    x0_coeff = _sqrt(a_prev) * current_beta_t / beta_prod_t
    xt_coeff = _sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + xt_coeff * x
    # 4. + σ_t·z, σ_t² = β̃_t (fixed_small, clamped at 1e-20) or β_t (fixed_large)
    if noise is not None:
        if variance_type == "fixed_small":
            variance = beta_prod_t_prev / beta_prod_t * current_beta_t
            variance = variance.clamp(min=1e-20) if isinstance(variance, torch.Tensor) else max(variance, 1e-20)
        else:
            variance = current_beta_t
        prev = prev + _sqrt(variance) * noise.float()
    return prev.to(dtype), x0.to(dtype)


def linear_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    coefficients: Sequence[Sequence[float]],
    guidance_scale: float | None = None,
    clip_sample_range: float | None = None,
    threshold: tuple[float, float] | None = None,
) -> list[torch.Tensor]:
    """A sampler update written as linear combinations: every scheduler step that is elementwise once its per-step
    coefficients are known (Euler, DPM-Solver, UniPC, LMS, PNDM, Heun, LCM, ...), with classifier-free guidance.

    Operands, in order: x (``sample``), m (the model output, guided: uncond + s·(cond − uncond) when
    ``guidance_scale`` is given and model_output is (2B, ...) = [uncond; cond]), then ``inputs`` (history, stored
    samples, noise; each sample's shape), then the outputs already computed. Output j is
    Σ_i coefficients[j][i]·operand_i over its first 2 + len(inputs) + j operands; terms whose coefficient is exactly
    0 are skipped. Output 0 is bounded: clamped to [−r, r] (``clip_sample_range``) or dynamically thresholded
    (``threshold`` = (ratio, max_value)) before later outputs read it. Computed in fp32 (float64 inputs in float64);
    returns the outputs as fp32 tensors of sample's shape (float64 for float64 inputs).
    """
    work = torch.float64 if sample.dtype == torch.float64 else torch.float32
    operands = [sample.to(work), classifier_free_guidance(model_output.to(work), guidance_scale),
                *(t.to(work) for t in inputs)]
    outputs = []
    for j, row in enumerate(coefficients):
        out = None
        for c, operand in zip(row, operands):
            if c == 0.0:
                continue
            out = operand * c if out is None else out.add(operand, alpha=c)
        out = torch.zeros_like(operands[0]) if out is None else out
        if j == 0 and threshold is not None:
            out = dynamic_threshold(out, *threshold)
        elif j == 0 and clip_sample_range is not None:
            out = out.clamp(-clip_sample_range, clip_sample_range)
        outputs.append(out)
        operands.append(out)
    return outputs


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row per row of z by squared L2 → (indices int64 (N,), distances fp32 (N,)).

    z: (N, D), codebook: (K, D), one floating dtype, computed in fp32. Chunked over rows of z (chunk_size rows,
    by default as many as keep a chunk's distances to 2**22 elements = 16 MiB), so memory stays bounded for any N.
    Ties → the lowest index: ``argmin`` guarantees the first minimum (``min(dim)`` documents no such order).
    """
    n, k = z.shape[0], codebook.shape[0]
    rows = chunk_size if chunk_size is not None else max(1, (1 << 22) // max(k, 1))
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, dtype=torch.float32, device=z.device)
    e = codebook.float()
    e_sq = (e * e).sum(1)  # (K,)
    for start in range(0, n, rows):
        zc = z[start : start + rows].float()
        # ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖², the ‖z‖² term is constant per row for the argmin
        d = torch.addmm(e_sq, zc, e.t(), beta=1.0, alpha=-2.0)  # (chunk, K)
        idx = d.argmin(1)
        best = d.gather(1, idx[:, None]).squeeze(1)
        indices[start : start + rows] = idx
        distances[start : start + rows] = (best + (zc * zc).sum(1)).clamp_min_(0)
    return indices, distances
