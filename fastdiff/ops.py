"""Public fastdiff ops: validate the input, then dispatch (fastdiff.dispatch decides the path).

Each op is a custom op in the ``fastdiff`` namespace (``torch.ops.fastdiff.<name>``) with a fake implementation,
so torch.compile (fullgraph=True) and CUDA-graph capture see one op. When autograd needs gradients the public
function calls the differentiable reference directly: the kernels are for inference.

Errors: every function raises TypeError/ValueError naming the argument, before any work is done. Tensor
values are never read back to the host (no device sync in the hot path).
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch import Tensor

from fastdiff import dispatch, reference
from fastdiff.validation import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    check_bool,
    check_choice,
    check_real,
    check_same_device,
    check_tensor,
)

__all__ = ["group_norm_silu", "conv3x3", "attention", "ddim_step", "ddpm_step", "linear_step", "vq_nearest"]


# --------------------------------------------------------------------------------------------- helpers
def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layout(x: Tensor) -> Tensor:
    """Contiguous or channels_last pass through untouched; any other stride pattern is copied to contiguous."""
    if x.is_contiguous():
        return x
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _call(op, *args):
    """Run a registered op. Under torch.compile the custom op is one node of the graph; in eager mode its
    implementation is called directly, which skips tens of microseconds of custom-op dispatch per call."""
    if torch.compiler.is_compiling():
        return op(*args)
    return op._init_fn(*args)


def _run(op: str, device: torch.device, backend: str, family: str, *args):
    """Inside a custom op: pick the path, count it, run the reference or the Triton host function.

    A CUDA launch runs with the tensors' device current (Triton launches on the current device and its current
    stream): tensors on cuda:1 while cuda:0 is current would otherwise fail or run unordered with their producers."""
    path = dispatch.select(op, device, backend)
    dispatch.record(op, path)
    if path == "torch":
        return getattr(reference, op)(*args)
    if path == "native":
        return _NATIVE[op](*args)
    host = getattr(dispatch.load_kernels(family), op)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return host(*args)
    return host(*args)


# --------------------------------------------------------------------------------------------- group_norm_silu
def _group_norm_silu_native(x, num_groups, weight, bias, eps, activation):
    """The extension's C++ kernel (csrc/group_norm_silu_cpu.cpp): fp32/bf16/fp16, NCHW or channels_last."""
    return torch.ops.fastdiff.group_norm_silu_native(x, num_groups, weight, bias, eps, activation == "silu")


_NATIVE = {"group_norm_silu": _group_norm_silu_native}  # dispatch path "native" of the Triton ops, by op


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, activation: str,
    backend: str,
) -> Tensor:
    act = None if activation == "none" else activation
    return _run("group_norm_silu", x.device, backend, "group_norm_silu", x, num_groups, weight, bias, eps, act)


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, activation, backend):
    return torch.empty_like(x)


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = "silu",
    backend: Optional[str] = None,
) -> Tensor:
    """GroupNorm (statistics in fp32) followed by SiLU, fused.

    Args:
        x: (N, C, *spatial), fp32/fp16/bf16, contiguous or channels_last (other layouts are copied).
        num_groups: G, dividing C.
        weight, bias: optional (C,) affine parameters, fp32 or x's dtype, on x's device.
        eps: added to the variance, > 0.
        activation: "silu" (default) or None for plain GroupNorm.
        backend: None/"auto" (the dispatch rule: Triton on CUDA, the native C++ kernel on the CPU where the
            extension is built, else the reference), "torch" (reference), "triton" or "native" (force that kernel).
    Returns:
        y, same shape, dtype and memory format as x.
    Raises:
        TypeError/ValueError naming the bad argument.
    """
    check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) with at least 2 dims, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of C={channels}, got {num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, (torch.float32, x.dtype))
            if p.shape != (channels,):
                raise ValueError(f"{name} must have shape ({channels},), got {tuple(p.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    eps = check_real("eps", eps, positive=True)
    check_choice("activation", activation, ("silu", None))
    backend = dispatch.check_backend(backend)
    if _needs_grad(x, weight, bias):
        dispatch.record("group_norm_silu", "torch")
        return reference.group_norm_silu(x, num_groups, weight, bias, eps, activation)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    return _call(_group_norm_silu_op, _layout(x), num_groups, weight, bias, eps, activation or "none", backend)


# --------------------------------------------------------------------------------------------- conv3x3
# Winograd F(m×m, 3×3): the filter transform G (A × 3, A = m + 2) for m = 2 (points 0, ±1, ∞) and m = 4 (points 0, ±1,
# ±2, ∞). Bᵀ and Aᵀ, the input and output transforms, are in csrc/cpu/winograd_loops.h.
_WINOGRAD_G = {
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}
_winograd_weights: dict = {}  # (id(weight), tile) -> (weakref, copy of weight, transformed); dropped with the weight


def winograd_tile(x_shape, dtype: torch.dtype, weight_shape) -> int:
    """The Winograd output tile m the CPU path of :func:`conv3x3` uses (0: torch's direct convolution).

    fp32: F(4×4, 3×3) (36 products per 16 outputs instead of 144; rounding error a few times the direct
    convolution's, still ~1e-5 relative) on images of 8 pixels or more, F(2×2, 3×3) below; bf16: F(2×2, 3×3)
    (F(4×4)'s larger transform coefficients cost bf16 too many digits) from 128 input and 64 output channels,
    direct below (measured on a 2-core AVX-512 CPU: at 64 channels oneDNN's bf16 direct convolution is as fast);
    fp16 and fewer than 16 channels: direct. Chosen from the dtype, the channels and the image size, never the
    batch, so a sample's output does not depend on the batch it is in.
    """
    _, channels, height, width = x_shape
    out_channels = weight_shape[0]
    if dtype == torch.float32 and min(channels, out_channels) >= 16:
        return 4 if min(height, width) >= 8 else 2
    if dtype == torch.bfloat16 and channels >= 128 and out_channels >= 64:
        return 2
    return 0


def winograd_weight(weight: Tensor, tile: int) -> Tensor:
    """The transformed filters U = G g Gᵀ of every (out, in) channel pair for F(tile×tile, 3×3).

    weight: (K, C, 3, 3) → (A², C, K), A = tile + 2, in weight's dtype (computed in fp64, rounded once); the ``u``
    of ``torch.ops.fastdiff.conv3x3_winograd_native``.
    """
    if tile not in _WINOGRAD_G:
        raise ValueError(f"tile must be one of {sorted(_WINOGRAD_G)}, got {tile!r}")
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64, device=weight.device)
    a = tile + 2
    u = torch.einsum("ij,kcjl,ml->imck", g, weight.detach().double(), g)
    return u.reshape(a * a, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _cached_winograd_weight(weight: Tensor, tile: int) -> Tensor:
    """:func:`winograd_weight`, computed once per weight tensor and tile and kept while the weight lives (it takes
    A²/9 times the weight's memory: 4× for F(4×4), 1.8× for F(2×2), plus a copy of the weight). Recomputed whenever
    the weight's values differ from the copy kept with it (an exact comparison, so in-place updates through
    ``.data`` — EMA, ``load_state_dict`` — are seen too), or its dtype or device changed."""
    key = (id(weight), tile)
    hit = _winograd_weights.get(key)
    if hit is not None:
        ref, copy, transformed = hit
        same = ref() is weight and copy.dtype == weight.dtype and copy.device == weight.device
        if same and torch.equal(copy, weight):
            return transformed
    transformed = winograd_weight(weight, tile)
    ref = weakref.ref(weight, lambda _, key=key: _winograd_weights.pop(key, None))
    _winograd_weights[key] = (ref, weight.detach().clone(), transformed)
    return transformed


def conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """3×3 convolution, stride 1, zero padding 1: ``F.conv2d(x, weight, bias, padding=1)``, by Winograd on the CPU.

    On CPU tensors the native extension runs Winograd's minimal filtering (:func:`winograd_tile` says which
    variant, from the dtype, channels and image size): input tiles transformed in fp32, the products as one GEMM per
    tile position on blocks of a fixed number of tiles, the bias added in the output transform; the transformed
    filters are computed once per weight tensor and cached. The output of a sample is the same bits whatever the
    batch size or thread count. Elsewhere (CUDA, autograd, torch.compile, fp16, few channels) it is F.conv2d.

    Args:
        x: (N, C, H, W) fp32/bf16/fp16, any strides (channels_last is the CPU path's own layout).
        weight: (K, C, 3, 3), x's dtype and device.
        bias: optional (K,), fp32 or x's dtype.
        backend: None/"auto" (the native path on the CPU where the extension has it), "torch" (F.conv2d) or
            "native" (on CPU tensors: RuntimeError if the extension cannot run here; CUDA tensors always take
            F.conv2d); "triton" means "torch" (no Triton kernel).
    Returns:
        (N, K, H, W) in x's dtype; channels_last where x is, contiguous where x is contiguous.
    Raises:
        TypeError/ValueError naming the bad argument.
    """
    check_tensor("x", x)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, (x.dtype,))
    if weight.ndim != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"weight must have shape (K, {x.shape[1]}, 3, 3) for x with C={x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, (torch.float32, x.dtype))
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    backend = dispatch.check_backend(backend)
    if torch.compiler.is_compiling() or _needs_grad(x, weight, bias):
        return reference.conv3x3(x, weight, bias)  # inductor's own convolution; autograd
    path = dispatch.select("conv3x3", x.device, backend)
    tile = winograd_tile(x.shape, x.dtype, weight.shape) if path == "native" and x.numel() else 0
    if tile == 0:
        dispatch.record("conv3x3", "torch")
        return reference.conv3x3(x, weight, bias)
    dispatch.record("conv3x3", "native")
    y = torch.ops.fastdiff.conv3x3_winograd_native(x, _cached_winograd_weight(weight, tile), bias, tile)
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous()
    return y


# --------------------------------------------------------------------------------------------- attention
@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tensor:
    return _run("attention", q.device, backend, "attention", q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    return q.new_empty(q.shape)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """softmax(q kᵀ · scale) v with an fp32 online softmax; the (N, M) scores never reach device memory.

    Args:
        q: (B, H, N, D); k, v: (B, H, M, D). Self-attention M = N, cross-attention any M ≥ 1 (e.g. 77 tokens).
           One dtype (fp32/fp16/bf16) and one device for all three; any strides.
        scale: the softmax scale, default D ** -0.5.
        backend: None/"auto", "torch" or "triton".
    Returns:
        (B, H, N, D), q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, seq, D) (4 dims), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    b, h, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: q has B={b}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(f"head mismatch: q has H={h}, k has {k.shape[1]}, v has {v.shape[1]}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"head-dim mismatch: q has D={d}, k has {k.shape[3]}, v has {v.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length M, got {k.shape[2]} and {v.shape[2]}")
    if n < 1 or k.shape[2] < 1 or d < 1:
        raise ValueError(f"q, k, v need N ≥ 1, M ≥ 1 and D ≥ 1, got N={n}, M={k.shape[2]}, D={d}")
    scale = d**-0.5 if scale is None else check_real("scale", scale)
    backend = dispatch.check_backend(backend)
    if _needs_grad(q, k, v):
        dispatch.record("attention", "torch")
        return reference.attention(q, k, v, scale)
    return _call(_attention_op, q, k, v, scale, backend)


# --------------------------------------------------------------------------------------------- ddim / ddpm steps
def _check_alpha(name: str, alpha, sample: Tensor, *, one_ok: bool = True):
    """A number in (0, 1] ((0, 1) when not one_ok), or a per-sample tensor of shape (B,) on the sample's device (its
    values are not read)."""
    if isinstance(alpha, Tensor):
        check_tensor(name, alpha, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        if alpha.shape != (sample.shape[0],):
            raise ValueError(f"{name} must be a number or a tensor of shape ({sample.shape[0]},), "
                             f"got shape {tuple(alpha.shape)}")
        if alpha.device != sample.device:
            raise ValueError(f"{name} is on {alpha.device} but sample is on {sample.device}")
        return alpha.float().contiguous()
    value = check_real(name, alpha)
    if one_ok and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    if not one_ok and not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (the step divides by 1 − {name}), got {value}")
    return value


def _check_step(sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, clip_sample_range,
                guidance_scale):
    check_tensor("sample", sample)
    check_tensor("model_output", model_output)
    if model_output.dtype != sample.dtype:
        raise TypeError(f"model_output must have sample's dtype {sample.dtype}, got {model_output.dtype}")
    if sample.ndim < 1:
        raise ValueError("sample must have a batch dimension")
    if model_output.ndim != sample.ndim:
        raise ValueError(f"model_output must have sample's rank {sample.ndim}, got shape {tuple(model_output.shape)}")
    if noise is not None:
        check_tensor("noise", noise)
    check_same_device(sample=sample, model_output=model_output, noise=noise)
    guidance_scale = check_real("guidance_scale", guidance_scale, allow_none=True)
    if guidance_scale is None:
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have sample's shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
    else:
        if model_output.shape[0] % 2 != 0:
            raise ValueError(f"with guidance_scale, model_output stacks [uncond; cond] along the batch and needs an "
                             f"even batch, got {model_output.shape[0]}")
        expected = (2 * sample.shape[0], *sample.shape[1:])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"with guidance_scale, model_output must have shape {expected} ([uncond; cond]), "
                             f"got {tuple(model_output.shape)}")
    if noise is not None:
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    clip_sample_range = check_real("clip_sample_range", clip_sample_range, allow_none=True, positive=True)
    a_t = _check_alpha("alpha_prod_t", alpha_prod_t, sample, one_ok=False)
    a_prev = _check_alpha("alpha_prod_t_prev", alpha_prod_t_prev, sample)
    return a_t, a_prev, clip_sample_range, guidance_scale


def _split_alpha(alpha):
    """(tensor or None, float) for the custom-op schema, which has no float-or-tensor union."""
    return (alpha, 0.0) if isinstance(alpha, Tensor) else (None, alpha)


def _join_alpha(tensor: Optional[Tensor], value: float):
    return tensor if tensor is not None else value


@torch.library.custom_op("fastdiff::ddim_step", mutates_args=())
def _ddim_step_op(
    sample: Tensor, model_output: Tensor, alpha_t: Optional[Tensor], alpha_prev: Optional[Tensor], alpha_t_value: float,
    alpha_prev_value: float, eta: float, noise: Optional[Tensor], prediction_type: str,
    clip_sample_range: Optional[float], guidance_scale: Optional[float], use_clipped_model_output: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return _run("ddim_step", sample.device, backend, "ddim_step", sample, model_output,
                _join_alpha(alpha_t, alpha_t_value), _join_alpha(alpha_prev, alpha_prev_value), eta, noise,
                prediction_type, clip_sample_range, guidance_scale, use_clipped_model_output)


@_ddim_step_op.register_fake
def _(sample, model_output, alpha_t, alpha_prev, alpha_t_value, alpha_prev_value, eta, noise, prediction_type,
      clip_sample_range, guidance_scale, use_clipped_model_output, backend):
    return torch.empty_like(sample), torch.empty_like(sample)


def ddim_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    use_clipped_model_output: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update, with classifier-free guidance fused in → (prev_sample, pred_original_sample).

    Args:
        sample: x_t, (B, ...) fp32/fp16/bf16.
        model_output: the model's prediction, sample's shape; with guidance_scale, (2B, ...) = [uncond; cond].
        alpha_prod_t, alpha_prod_t_prev: ᾱ_t and ᾱ_prev, numbers in (0, 1] or per-sample (B,) tensors.
        eta: the DDIM η ≥ 0 (0 is deterministic); η > 0 needs ``noise``.
        noise: z ~ N(0, I), sample's shape (used only when η > 0).
        prediction_type: "epsilon", "sample" or "v_prediction".
        clip_sample_range: r clamps x0 to [−r, r]; None disables clipping.
        guidance_scale: s combines ε = uncond + s·(cond − uncond) in the same kernel.
        use_clipped_model_output: re-derive ε from the clipped x0 (diffusers' option of the same name).
        backend: None/"auto", "torch" or "triton".
    Returns:
        (prev_sample, pred_original_sample), both sample's shape and dtype.
    """
    a_t, a_prev, clip_sample_range, guidance_scale = _check_step(
        sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, clip_sample_range,
        guidance_scale)
    eta = check_real("eta", eta, nonneg=True)
    # a bool; None (what some diffusers callers pass) is False
    use_clipped_model_output = (False if use_clipped_model_output is None
                                else check_bool("use_clipped_model_output", use_clipped_model_output))
    if eta > 0 and noise is None:
        raise ValueError("noise is required when eta > 0 (pass torch.randn_like(sample))")
    backend = dispatch.check_backend(backend)
    if _needs_grad(sample, model_output, noise):
        dispatch.record("ddim_step", "torch")
        return reference.ddim_step(sample, model_output, a_t, a_prev, eta, noise, prediction_type, clip_sample_range,
                                   guidance_scale, bool(use_clipped_model_output))
    (at_t, at_v), (ap_t, ap_v) = _split_alpha(a_t), _split_alpha(a_prev)
    return _call(_ddim_step_op, sample.contiguous(), model_output.contiguous(), at_t, ap_t, at_v, ap_v, eta,
                         noise.contiguous() if noise is not None else None, prediction_type, clip_sample_range,
                         guidance_scale, bool(use_clipped_model_output), backend)


@torch.library.custom_op("fastdiff::ddpm_step", mutates_args=())
def _ddpm_step_op(
    sample: Tensor, model_output: Tensor, alpha_t: Optional[Tensor], alpha_prev: Optional[Tensor], alpha_t_value: float,
    alpha_prev_value: float, noise: Optional[Tensor], variance_type: str, prediction_type: str,
    clip_sample_range: Optional[float], guidance_scale: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    return _run("ddpm_step", sample.device, backend, "ddpm_step", sample, model_output,
                _join_alpha(alpha_t, alpha_t_value), _join_alpha(alpha_prev, alpha_prev_value), noise, variance_type,
                prediction_type, clip_sample_range, guidance_scale)


@_ddpm_step_op.register_fake
def _(sample, model_output, alpha_t, alpha_prev, alpha_t_value, alpha_prev_value, noise, variance_type,
      prediction_type, clip_sample_range, guidance_scale, backend):
    return torch.empty_like(sample), torch.empty_like(sample)


def ddpm_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    noise: Optional[Tensor] = None,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM update, with classifier-free guidance fused in → (prev_sample, pred_original_sample).

    Args are as for :func:`ddim_step`; ``noise`` (sample's shape) adds σ_t·z, None adds nothing (the last step);
    variance_type "fixed_small" (σ² = β̃_t, the posterior variance) or "fixed_large" (σ² = β_t).
    """
    a_t, a_prev, clip_sample_range, guidance_scale = _check_step(
        sample, model_output, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, clip_sample_range,
        guidance_scale)
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    backend = dispatch.check_backend(backend)
    if _needs_grad(sample, model_output, noise):
        dispatch.record("ddpm_step", "torch")
        return reference.ddpm_step(sample, model_output, a_t, a_prev, noise, variance_type, prediction_type,
                                   clip_sample_range, guidance_scale)
    (at_t, at_v), (ap_t, ap_v) = _split_alpha(a_t), _split_alpha(a_prev)
    return _call(_ddpm_step_op, sample.contiguous(), model_output.contiguous(), at_t, ap_t, at_v, ap_v,
                         noise.contiguous() if noise is not None else None, variance_type, prediction_type,
                         clip_sample_range, guidance_scale, backend)


# --------------------------------------------------------------------------------------------- linear_step
MAX_STEP_INPUTS = 6  # history tensors, stored samples and noise one linear_step call reads
MAX_STEP_OUTPUTS = 3


def _check_coefficients(coefficients, n_inputs: int) -> list[list[float]]:
    """1..3 rows; row j has 2 + n_inputs + j finite numbers."""
    if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__len__"):
        raise TypeError(f"coefficients must be a sequence of rows of numbers, got {type(coefficients).__name__}")
    if not 1 <= len(coefficients) <= MAX_STEP_OUTPUTS:
        raise ValueError(f"coefficients must have 1 to {MAX_STEP_OUTPUTS} rows (one per output), "
                         f"got {len(coefficients)}")
    rows = []
    for j, row in enumerate(coefficients):
        expected = 2 + n_inputs + j
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) != expected:
            raise ValueError(f"coefficients[{j}] must have {expected} numbers (x, model output, {n_inputs} inputs, "
                             f"{j} earlier outputs), got {row!r}")
        rows.append([check_real(f"coefficients[{j}][{i}]", c) for i, c in enumerate(row)])
    return rows


@torch.library.custom_op("fastdiff::linear_step", mutates_args=())
def _linear_step_op(
    sample: Tensor, model_output: Tensor, inputs: list[Tensor], coefficients: list[float], n_outputs: int,
    guidance_scale: Optional[float], clip_sample_range: Optional[float], backend: str,
) -> list[Tensor]:
    return _run("linear_step", sample.device, backend, "linear_step", sample, model_output, inputs,
                _coefficient_rows(coefficients, n_outputs, len(inputs)), guidance_scale, clip_sample_range)


def _coefficient_rows(flat: list[float], n_outputs: int, n_inputs: int) -> list[list[float]]:
    """The flat coefficient list of the op's schema back into rows of 2 + n_inputs + j numbers."""
    rows, start = [], 0
    for j in range(n_outputs):
        width = 2 + n_inputs + j
        rows.append(list(flat[start:start + width]))
        start += width
    return rows


@_linear_step_op.register_fake
def _(sample, model_output, inputs, coefficients, n_outputs, guidance_scale, clip_sample_range, backend):
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    return [torch.empty_like(sample, dtype=dtype) for _ in range(n_outputs)]


def linear_step(
    sample: Tensor,
    model_output: Tensor,
    inputs=(),
    *,
    coefficients,
    guidance_scale: Optional[float] = None,
    clip_sample_range: Optional[float] = None,
    threshold: Optional[tuple[float, float]] = None,
    backend: Optional[str] = None,
) -> list[Tensor]:
    """One sampler update written as linear combinations, with classifier-free guidance fused in: on the GPU one
    kernel reads x, the model output and each input once and writes each output once. The schedulers whose update
    is elementwise once the step's coefficients are known run through it (Euler, DPM-Solver, UniPC, DEIS, LMS, PNDM,
    Heun, KDPM2, LCM; see docs/schedulers.md).

    Operands, in order: x = ``sample``; m = ``model_output`` (guided: uncond + s·(cond − uncond) with
    ``guidance_scale``); the ``inputs``; then the outputs already computed. Output j =
    Σ_i coefficients[j][i]·operand_i over its 2 + len(inputs) + j operands (a coefficient of exactly 0 skips its
    term: 0·NaN stays out). Output 0 (usually the predicted x0) is clamped to [−r, r] with ``clip_sample_range``, or
    dynamically thresholded with ``threshold`` = (ratio, max_value) (a per-sample quantile: the reference's torch
    code, not the kernel), before later outputs read it.

    Args:
        sample: x, (B, ...) fp32/fp16/bf16 (float64 runs the reference in float64).
        model_output: sample's shape and dtype; with guidance_scale, (2B, ...) = [uncond; cond].
        inputs: up to 6 tensors of sample's shape, any floating dtype, on sample's device.
        coefficients: 1 to 3 rows of Python numbers (computed on the host, in float64 by the schedulers).
    Returns:
        a list with one tensor per row: fp32 (float64 for float64 samples), sample's shape.
    """
    guidance_scale = check_real("guidance_scale", guidance_scale, allow_none=True)
    check_step_inputs_common(sample, model_output, guidance_scale)
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list or tuple of tensors, got {type(inputs).__name__}")
    if len(inputs) > MAX_STEP_INPUTS:
        raise ValueError(f"inputs takes at most {MAX_STEP_INPUTS} tensors, got {len(inputs)}")
    for i, t in enumerate(inputs):
        check_tensor(f"inputs[{i}]", t, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if t.shape != sample.shape:
            raise ValueError(f"inputs[{i}] must have sample's shape {tuple(sample.shape)}, got {tuple(t.shape)}")
        if t.device != sample.device:
            raise ValueError(f"inputs[{i}] is on {t.device} but sample is on {sample.device}")
    rows = _check_coefficients(coefficients, len(inputs))
    clip_sample_range = check_real("clip_sample_range", clip_sample_range, allow_none=True, positive=True)
    if threshold is not None:
        if not isinstance(threshold, (tuple, list)) or len(threshold) != 2:
            raise ValueError(f"threshold must be (ratio, max_value), got {threshold!r}")
        ratio, max_value = (check_real("threshold", v, positive=True) for v in threshold)
        if ratio > 1.0:
            raise ValueError(f"threshold's ratio must be in (0, 1], got {ratio}")
        threshold = (ratio, max_value)
    backend = dispatch.check_backend(backend)
    if threshold is not None or sample.dtype == torch.float64 or _needs_grad(sample, model_output, *inputs):
        dispatch.record("linear_step", "torch")
        return reference.linear_step(sample, model_output, list(inputs), rows, guidance_scale, clip_sample_range,
                                     threshold)
    flat = [c for row in rows for c in row]
    return _call(_linear_step_op, sample.contiguous(), model_output.contiguous(), [t.contiguous() for t in inputs],
                 flat, len(rows), guidance_scale, clip_sample_range, backend)


def check_step_inputs_common(sample, model_output, guidance_scale) -> None:
    """sample and model_output: floating tensors of one dtype and device; model_output sample's shape, or
    (2B, ...) = [uncond; cond] with guidance_scale."""
    check_tensor("sample", sample, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_tensor("model_output", model_output, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if model_output.dtype != sample.dtype:
        raise TypeError(f"model_output must have sample's dtype {sample.dtype}, got {model_output.dtype}")
    if sample.ndim < 1:
        raise ValueError("sample must have a batch dimension")
    check_same_device(sample=sample, model_output=model_output)
    expected = tuple(sample.shape) if guidance_scale is None else (2 * sample.shape[0], *sample.shape[1:])
    if tuple(model_output.shape) != expected:
        what = "sample's shape" if guidance_scale is None else "(2B, ...) = [uncond; cond] with guidance_scale"
        raise ValueError(f"model_output must have {what} {expected}, got {tuple(model_output.shape)}")


# --------------------------------------------------------------------------------------------- vq_nearest
def vq_nearest(
    z: Tensor,
    codebook: Tensor,
    *,
    return_distances: bool = False,
    backend: Optional[str] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Nearest codebook row for every row of z by squared L2 distance (the VQ-VAE quantisation step).

    The native extension (``torch.ops.fastdiff.vq_nearest``: C++ on CPU, CUDA on GPU) runs where it is built or
    can be built just in time; elsewhere the chunked PyTorch reference runs (see :mod:`fastdiff.native`). Neither
    stores the N × K distance matrix.

    Args:
        z: (N, D) fp32/fp16/bf16, any strides; N = 0 gives empty outputs.
        codebook: (K, D) with K ≥ 1, z's dtype and device, any strides.
        return_distances: also return the squared distances.
        backend: None/"auto" (FASTDIFF_BACKEND, then the extension where available), "torch" (reference) or
            "native" (the extension; RuntimeError if it cannot run here).
    Returns:
        indices (N,) int64, argmin over k of ‖z_n − e_k‖², ties → the lowest k (like torch.argmin); with
        return_distances also distances (N,) fp32, that minimum (computed as ‖z‖² − 2 z·e + ‖e‖² in fp32,
        clamped at 0). Differentiable in the distances only on the reference path (chosen when grads are needed).
    Raises:
        TypeError: z or codebook is not a floating tensor of the supported dtypes, or their dtypes differ.
        ValueError: z not 2-D, codebook not 2-D, D mismatch, D = 0, K = 0, different devices, bad backend.
    """
    check_tensor("z", z)
    check_tensor("codebook", codebook)
    if z.ndim != 2:
        raise ValueError(f"z must have shape (N, D) (2 dims), got shape {tuple(z.shape)}")
    if codebook.ndim != 2:
        raise ValueError(f"codebook must have shape (K, D) (2 dims), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"codebook must have z's D={z.shape[1]} columns, got shape {tuple(codebook.shape)}")
    if z.shape[1] < 1:
        raise ValueError(f"z and codebook need D ≥ 1 columns, got shape {tuple(z.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError(f"codebook must have at least one row (K ≥ 1), got shape {tuple(codebook.shape)}")
    if codebook.dtype != z.dtype:
        raise TypeError(f"codebook must have z's dtype {z.dtype}, got {codebook.dtype}")
    check_same_device(z=z, codebook=codebook)
    if not isinstance(return_distances, bool):
        raise TypeError(f"return_distances must be a bool, got {type(return_distances).__name__}")
    backend = dispatch.check_backend(backend)
    if backend == "triton":
        raise ValueError("backend='triton': vq_nearest has no Triton kernel; use None/'auto', 'torch' or 'native'")
    # autograd through the distances needs the reference (the native kernel has no backward), whatever the backend
    needs_grad = return_distances and _needs_grad(z, codebook)
    path = "torch" if needs_grad else dispatch.select("vq_nearest", z.device, backend)
    dispatch.record("vq_nearest", path)
    if path == "native":
        indices, distances = torch.ops.fastdiff.vq_nearest(z.detach(), codebook.detach())
    else:
        indices, distances = reference.vq_nearest(z, codebook)
    return (indices, distances) if return_distances else indices


# --------------------------------------------------------------------------------------------- torch.compile
# Under torch.compile the public ops above are single graph nodes (their fake implementations give the shapes).
# For CUDA tensors on the Triton path, AOT autograd's functionalization then replaces each node by a Triton op
# (torch.library.triton_op): an op whose body is the kernels' own host function with every launch wrapped by
# torch.library.wrap_triton (fastdiff.kernels.target.launcher), so the graph that reaches inductor holds the Triton
# kernels themselves. Inductor compiles and schedules them with the code around them (fusing its own kernels up to
# them, planning their buffers) and mode="reduce-overhead" captures them in its CUDA graphs. On the reference path
# (CPU tensors) the node becomes the reference's PyTorch code, which inductor fuses like any other (GroupNorm with
# the SiLU after it, the step's arithmetic). The interpreter and torch.export keep the opaque op. Eager mode never
# goes through any of this.
@functools.cache
def triton_ops() -> dict:
    """The Triton ops, by public op name, defined on first use (a trace for torch.compile; defining them imports
    torch's compiler stack, about a second, which plain eager use never pays); {} where torch has no triton_op
    (before 2.6) or Triton is not installed (torch would log a warning per op; there is no Triton path to trace
    then anyway)."""
    import importlib.util

    triton_op = getattr(torch.library, "triton_op", None)
    try:
        has_triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        has_triton = False
    if triton_op is None or not has_triton:
        return {}

    @triton_op("fastdiff::group_norm_silu_triton", mutates_args=())
    def group_norm_silu_triton(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                               eps: float, activation: str) -> Tensor:
        return dispatch.load_kernels("group_norm_silu").group_norm_silu(
            x, num_groups, weight, bias, eps, None if activation == "none" else activation)

    @triton_op("fastdiff::attention_triton", mutates_args=())
    def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return dispatch.load_kernels("attention").attention(q, k, v, scale)

    @triton_op("fastdiff::ddim_step_triton", mutates_args=())
    def ddim_step_triton(
        sample: Tensor, model_output: Tensor, alpha_t: Optional[Tensor], alpha_prev: Optional[Tensor],
        alpha_t_value: float, alpha_prev_value: float, eta: float, noise: Optional[Tensor], prediction_type: str,
        clip_sample_range: Optional[float], guidance_scale: Optional[float], use_clipped_model_output: bool,
    ) -> tuple[Tensor, Tensor]:
        return dispatch.load_kernels("ddim_step").ddim_step(
            sample, model_output, _join_alpha(alpha_t, alpha_t_value), _join_alpha(alpha_prev, alpha_prev_value), eta,
            noise, prediction_type, clip_sample_range, guidance_scale, use_clipped_model_output)

    @triton_op("fastdiff::ddpm_step_triton", mutates_args=())
    def ddpm_step_triton(
        sample: Tensor, model_output: Tensor, alpha_t: Optional[Tensor], alpha_prev: Optional[Tensor],
        alpha_t_value: float, alpha_prev_value: float, noise: Optional[Tensor], variance_type: str,
        prediction_type: str, clip_sample_range: Optional[float], guidance_scale: Optional[float],
    ) -> tuple[Tensor, Tensor]:
        return dispatch.load_kernels("ddpm_step").ddpm_step(
            sample, model_output, _join_alpha(alpha_t, alpha_t_value), _join_alpha(alpha_prev, alpha_prev_value),
            noise, variance_type, prediction_type, clip_sample_range, guidance_scale)

    @triton_op("fastdiff::linear_step_triton", mutates_args=())
    def linear_step_triton(
        sample: Tensor, model_output: Tensor, inputs: list[Tensor], coefficients: list[float], n_outputs: int,
        guidance_scale: Optional[float], clip_sample_range: Optional[float],
    ) -> list[Tensor]:
        return dispatch.load_kernels("linear_step").linear_step(
            sample, model_output, inputs, _coefficient_rows(coefficients, n_outputs, len(inputs)), guidance_scale,
            clip_sample_range)

    return {"group_norm_silu": group_norm_silu_triton, "attention": attention_triton,
            "ddim_step": ddim_step_triton, "ddpm_step": ddpm_step_triton, "linear_step": linear_step_triton}


def _inline_for_compile(name: str, opaque) -> None:
    """Functionalization of ``opaque`` (the public op, backend last) becomes the op's Triton op on the Triton path
    and the reference's code on the reference path."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
    except ImportError:  # pragma: no cover
        return
    if not hasattr(opaque, "register_torch_dispatch"):  # pragma: no cover - torch before 2.5: the op stays opaque
        return

    def export_keeps_ops() -> bool:
        try:
            from torch.export._trace import custom_triton_ops_decomposition_disabled
        except ImportError:  # pragma: no cover
            return False
        return custom_triton_ops_decomposition_disabled()

    def functional(mode, op, types, args, kwargs):
        if any(t not in (torch.Tensor, FakeTensor, FunctionalTensor) for t in types) or kwargs or export_keeps_ops():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        path = dispatch.select(name, args[0].device, args[-1])
        triton_op = triton_ops().get(name) if path == "triton" else None
        if triton_op is not None:
            with mode:
                return triton_op(*args[:-1])
        if path in ("torch", "native"):  # the CPU's paths: the reference's PyTorch code, for inductor to fuse
            with mode:                     # with the rest (it generates its own fused CPU loop)
                return opaque._init_fn(*args[:-1], "torch")
        return mode.__torch_dispatch__(op, types, args, kwargs)  # the interpreter: one opaque call

    opaque.register_torch_dispatch(FunctionalTensorMode, functional)


for _name, _opaque in (("group_norm_silu", _group_norm_silu_op), ("attention", _attention_op),
                       ("ddim_step", _ddim_step_op), ("ddpm_step", _ddpm_step_op),
                       ("linear_step", _linear_step_op)):
    _inline_for_compile(_name, _opaque)
