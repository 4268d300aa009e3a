"""Fused DDIM update with classifier-free guidance: one launch reads x_t, the model output and the noise once and writes
x_{t-1} and the predicted x0 once (the op ``fastdiff.ops.ddim_step``).

Layers (STYLE.md): a private ``@triton.jit`` kernel; the host function :func:`ddim_step` validates nothing
(``fastdiff.ops`` does), computes the host coefficients, allocates the outputs and launches (``step_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import step_common as common


@triton.jit
def _ddim_step_kernel(
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
    x0_coeff,  # sqrt(ᾱ_prev)
    eps_coeff,  # sqrt(1 − ᾱ_prev − σ_t²)
    std_dev,  # σ_t = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))
    eta,
    guidance_scale,
    clip_range,
    PREDICTION_TYPE: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PER_SAMPLE_ALPHA: tl.constexpr,
    CLIP: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ_t²)·ε + σ_t·z."""
    offs, mask, sample_idx = common.step_offsets(n_elements, per_sample_numel, PER_SAMPLE_ALPHA, BLOCK_SIZE)
    if PER_SAMPLE_ALPHA:
        alpha_t, alpha_prev, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta = common.load_alphas(
            ALPHA_T, ALPHA_PREV, sample_idx)
        variance = tl.div_rn(1.0 - alpha_prev, 1.0 - alpha_t) * (1.0 - tl.div_rn(alpha_t, alpha_prev))
        std_dev = eta * tl.sqrt_rn(variance)
        x0_coeff = tl.sqrt_rn(alpha_prev)
        eps_coeff = tl.sqrt_rn(1.0 - alpha_prev - std_dev * std_dev)
    # 1. guided model output, predicted x0 (clipped with CLIP) and ε
    x, x0, eps = common.predict_x0(X, M, offs, mask, n_elements, sqrt_alpha, sqrt_beta, inv_sqrt_alpha, inv_sqrt_beta,
                             guidance_scale, clip_range, PREDICTION_TYPE, HAS_GUIDANCE, CLIP)
    # 2. re-derive ε from the clipped x0 if asked
    if CLIP and USE_CLIPPED_MODEL_OUTPUT:
        eps = (x - sqrt_alpha * x0) * inv_sqrt_beta
    # 3. x_{t-1} = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ_t²)·ε (+ σ_t·z)
    prev = x0_coeff * x0 + eps_coeff * eps
    common.store_step(PREV, X0, Z, offs, mask, prev, x0, std_dev, HAS_NOISE)



def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    guidance_scale: float | None = None,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_ddim_step_kernel`. Inputs as validated by ``fastdiff.ops.ddim_step`` (contiguous; alphas
    Python floats or contiguous fp32 (B,) tensors) → (prev_sample, pred_original_sample), sample's shape and dtype."""
    scalars = [0.0] * 7  # computed on chip from the (B,) tensors
    if (alphas := common.float_alphas(alpha_prod_t, alpha_prod_t_prev)) is not None:
        a_t, a_prev = alphas
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std_dev = eta * common.sqrt_host(variance)
        scalars = [*common.alpha_roots_host(a_t), common.sqrt_host(a_prev),
                   common.sqrt_host(1.0 - a_prev - std_dev**2), std_dev]
    has_noise = noise is not None and eta > 0
    return common.launch(
        _ddim_step_kernel, sample, model_output, noise if has_noise else None, alpha_prod_t, alpha_prod_t_prev,
        [*scalars, float(eta), float(guidance_scale or 0.0), float(clip_sample_range or 0.0)],
        PREDICTION_TYPE=common.PREDICTION_CODES[prediction_type], HAS_GUIDANCE=guidance_scale is not None,
        HAS_NOISE=has_noise, CLIP=clip_sample_range is not None,
        USE_CLIPPED_MODEL_OUTPUT=bool(use_clipped_model_output),
    )
