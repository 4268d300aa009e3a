"""Fused DDPM update with classifier-free guidance: one launch reads x_t, the model output and the noise once and writes
x_{t-1} and the predicted x0 once (the op ``fastdiff.ops.ddpm_step``).

Layers (STYLE.md): a private ``@triton.jit`` kernel; the host function :func:`ddpm_step` validates nothing
(``fastdiff.ops`` does), computes the host coefficients, allocates the outputs and launches (``step_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import step_common as common


@triton.jit
def _ddpm_step_kernel(
    X,  # (N,) sample x_t, N = B * per_sample_numel
    M,  # (N,) model output, or (2N,) = [uncond; cond] with HAS_GUIDANCE
    Z,  # (N,) noise z (read with HAS_NOISE only)
    ALPHA_T,  # (B,) fp32 ᾱ_t (read with PER_SAMPLE_ALPHA only)
    ALPHA_PREV,  # (B,) fp32 ᾱ_prev (read with PER_SAMPLE_ALPHA only)
    PREV,  # (N,) out: x_{t-1}, sample's dtype
    X0,  # (N,) out: predicted x0, sample's dtype
    n_elements,
    per_sample_numel,
    sqrt_alpha,  # host coefficients for float alphas (ignored with PER_SAMPLE_ALPHA): sqrt(ᾱ_t)
    sqrt_beta,  # sqrt(1 − ᾱ_t)
    inv_sqrt_alpha,
    inv_sqrt_beta,
    x0_coeff,  # sqrt(ᾱ_prev)·β_t/(1 − ᾱ_t)
    xt_coeff,  # sqrt(α_t)·(1 − ᾱ_prev)/(1 − ᾱ_t)
    std_dev,  # σ_t: sqrt(β̃_t) (fixed_small) or sqrt(β_t) (fixed_large)
    guidance_scale,
    clip_range,
    PREDICTION_TYPE: tl.constexpr,
    VARIANCE_TYPE: tl.constexpr,  # 0 fixed_small, 1 fixed_large
    HAS_GUIDANCE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PER_SAMPLE_ALPHA: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """DDPM ancestral step (Ho et al. 2020, eq. 6–7): x_{t-1} = μ̃_t(x_t, x0) + σ_t·z."""
    offs, mask, sample_idx = common.step_offsets(n_elements, per_sample_numel, PER_SAMPLE_ALPHA, BLOCK_SIZE)
    if PER_SAMPLE_ALPHA:
        alpha_t, alpha_prev, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta = common.load_alphas(
            ALPHA_T, ALPHA_PREV, sample_idx)
        beta_prod_t = 1.0 - alpha_t
        beta_prod_t_prev = 1.0 - alpha_prev
        current_alpha_t = tl.div_rn(alpha_t, alpha_prev)
        current_beta_t = 1.0 - current_alpha_t
        x0_coeff = tl.div_rn(tl.sqrt_rn(alpha_prev) * current_beta_t, beta_prod_t)
        xt_coeff = tl.div_rn(tl.sqrt_rn(current_alpha_t) * beta_prod_t_prev, beta_prod_t)
        if VARIANCE_TYPE == 0:
            variance = tl.maximum(tl.div_rn(beta_prod_t_prev, beta_prod_t) * current_beta_t, 1e-20)
        else:
            variance = current_beta_t
        std_dev = tl.sqrt_rn(variance)
    # 1. guided model output and predicted x0, clipped with CLIP
    x, x0, _ = common.predict_x0(X, M, offs, mask, n_elements, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta,
                           guidance_scale, clip_range, PREDICTION_TYPE, HAS_GUIDANCE, CLIP)
    # 2. posterior mean μ̃ = sqrt(ᾱ_prev)·β_t/(1 − ᾱ_t)·x0 + sqrt(α_t)·(1 − ᾱ_prev)/(1 − ᾱ_t)·x_t (+ σ_t·z)
    prev = x0_coeff * x0 + xt_coeff * x
    common.store_step(PREV, X0, Z, offs, mask, prev, x0, std_dev, HAS_NOISE)



def ddpm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    noise: torch.Tensor | None = None,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    guidance_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_ddpm_step_kernel`. Inputs as validated by ``fastdiff.ops.ddpm_step`` → (prev_sample,
    pred_original_sample), sample's shape and dtype."""
    scalars = [0.0] * 7  # computed on chip from the (B,) tensors
    if (alphas := common.float_alphas(alpha_prod_t, alpha_prod_t_prev)) is not None:
        a_t, a_prev = alphas
        beta_prod_t, beta_prod_t_prev = 1.0 - a_t, 1.0 - a_prev
        current_alpha_t = a_t / a_prev
        current_beta_t = 1.0 - current_alpha_t
        if variance_type == "fixed_small":
            variance = max(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
        else:
            variance = current_beta_t
        scalars = [
            *common.alpha_roots_host(a_t),
            common.sqrt_host(a_prev) * current_beta_t / beta_prod_t,
            common.sqrt_host(current_alpha_t) * beta_prod_t_prev / beta_prod_t,
            common.sqrt_host(variance),
        ]
    return common.launch(
        _ddpm_step_kernel, sample, model_output, noise, alpha_prod_t, alpha_prod_t_prev,
        [*scalars, float(guidance_scale or 0.0), float(clip_sample_range or 0.0)],
        PREDICTION_TYPE=common.PREDICTION_CODES[prediction_type], VARIANCE_TYPE=common.VARIANCE_CODES[variance_type],
        HAS_GUIDANCE=guidance_scale is not None, HAS_NOISE=noise is not None, CLIP=clip_sample_range is not None,
    )
