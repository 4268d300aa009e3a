"""Fused sampler update as linear combinations (the op ``fastdiff.ops.linear_step``): one launch reads x, the model
output ([uncond; cond] with guidance, combined in registers) and up to six inputs (history, stored samples, noise)
once, and writes up to three outputs once. Every multistep or σ-space scheduler whose update is elementwise once its
per-step coefficients are known runs through it (the coefficients come from the host, computed in float64).

Layers (STYLE.md): a private ``@triton.jit`` kernel; the host function :func:`linear_step` validates nothing
(``fastdiff.ops`` does), lays the coefficients out in fixed slots, allocates the outputs and launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import step_common as common
from fastdiff.kernels import target

MAX_INPUTS = 6
MAX_OUTPUTS = 3


@triton.jit
def _axpy(acc, c, v):
    """acc + c·v, or acc as it is when c == 0 (a zero coefficient skips its term, so 0·NaN stays out)."""
    if c != 0.0:
        acc = acc + c * v
    return acc


@triton.jit
def _row(x, m, i0, i1, i2, i3, i4, i5, cx, cm, c0, c1, c2, c3, c4, c5, N_IN: tl.constexpr):
    """cx·x + cm·m + Σ_k c_k·input_k over the N_IN inputs."""
    acc = _axpy(tl.zeros_like(x), cx, x)
    acc = _axpy(acc, cm, m)
    if N_IN > 0:
        acc = _axpy(acc, c0, i0)
    if N_IN > 1:
        acc = _axpy(acc, c1, i1)
    if N_IN > 2:
        acc = _axpy(acc, c2, i2)
    if N_IN > 3:
        acc = _axpy(acc, c3, i3)
    if N_IN > 4:
        acc = _axpy(acc, c4, i4)
    if N_IN > 5:
        acc = _axpy(acc, c5, i5)
    return acc


@triton.jit
def _load(P, offs, mask, USE: tl.constexpr):
    """The input at ``offs`` in fp32, or zeros (never read) when it is not one of the N_IN inputs."""
    value = tl.zeros(offs.shape, tl.float32)
    if USE:
        value = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _linear_step_kernel(
    X,  # (N,) sample x
    M,  # (N,) model output, or (2N,) = [uncond; cond] with HAS_GUIDANCE
    I0, I1, I2, I3, I4, I5,  # (N,) inputs (the first N_IN are read)
    O0, O1, O2,  # (N,) fp32 outputs (the first N_OUT are written)
    n_elements,
    guidance_scale,
    clip_range,
    # row 0: x, m, inputs 0..5
    a_x, a_m, a_0, a_1, a_2, a_3, a_4, a_5,
    # row 1: x, m, inputs 0..5, output 0
    b_x, b_m, b_0, b_1, b_2, b_3, b_4, b_5, b_o0,
    # row 2: x, m, inputs 0..5, outputs 0 and 1
    d_x, d_m, d_0, d_1, d_2, d_3, d_4, d_5, d_o0, d_o1,
    N_IN: tl.constexpr,
    N_OUT: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """o0 = bound(row 0 · [x, m, inputs]); o1 = row 1 · [x, m, inputs, o0]; o2 = row 2 · [x, m, inputs, o0, o1]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    m = common.guided_model_output(M, offs, mask, n_elements, guidance_scale, HAS_GUIDANCE)
    i0 = _load(I0, offs, mask, N_IN > 0)
    i1 = _load(I1, offs, mask, N_IN > 1)
    i2 = _load(I2, offs, mask, N_IN > 2)
    i3 = _load(I3, offs, mask, N_IN > 3)
    i4 = _load(I4, offs, mask, N_IN > 4)
    i5 = _load(I5, offs, mask, N_IN > 5)
    o0 = _row(x, m, i0, i1, i2, i3, i4, i5, a_x, a_m, a_0, a_1, a_2, a_3, a_4, a_5, N_IN)
    if CLIP:
        o0 = common.clip(o0, clip_range)
    tl.store(O0 + offs, o0, mask=mask)
    if N_OUT > 1:
        o1 = _row(x, m, i0, i1, i2, i3, i4, i5, b_x, b_m, b_0, b_1, b_2, b_3, b_4, b_5, N_IN)
        o1 = _axpy(o1, b_o0, o0)
        tl.store(O1 + offs, o1, mask=mask)
        if N_OUT > 2:
            o2 = _row(x, m, i0, i1, i2, i3, i4, i5, d_x, d_m, d_0, d_1, d_2, d_3, d_4, d_5, N_IN)
            o2 = _axpy(o2, d_o0, o0)
            o2 = _axpy(o2, d_o1, o1)
            tl.store(O2 + offs, o2, mask=mask)


def _slots(rows: list[list[float]], n_inputs: int) -> list[float]:
    """The rows in the kernel's fixed slots (8, 9 and 10 scalars), zeros where an input or output is absent."""
    flat = []
    for j in range(MAX_OUTPUTS):
        row = rows[j] if j < len(rows) else [0.0] * (2 + n_inputs + j)
        head, ins, outs = row[:2], row[2:2 + n_inputs], row[2 + n_inputs:]
        flat += [float(c) for c in head + ins] + [0.0] * (MAX_INPUTS - n_inputs) + [float(c) for c in outs]
    return flat


def linear_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    inputs: list[torch.Tensor],
    coefficients: list[list[float]],
    guidance_scale: float | None = None,
    clip_sample_range: float | None = None,
) -> list[torch.Tensor]:
    """Launch :func:`_linear_step_kernel`. Inputs as validated by ``fastdiff.ops.linear_step`` (contiguous; up to six
    inputs; one to three coefficient rows) → one fp32 tensor of sample's shape per row."""
    outputs = [torch.empty(sample.shape, dtype=torch.float32, device=sample.device) for _ in coefficients]
    n_elements = sample.numel()
    if n_elements == 0:
        return outputs
    block, num_warps = common.block_size(n_elements, sample)
    if target.compiled_gpu(sample) and len(inputs) + len(coefficients) > 3:
        # many live operands: 4 elements per thread (one 128-bit fp32 access each), not 8 or 16, so that the values
        # of up to 6 inputs and 3 outputs fit the register cap without spilling (ptxas report: docs/kernels.md)
        block = 128 * num_warps
    ins = list(inputs) + [sample] * (MAX_INPUTS - len(inputs))  # placeholders, never read
    outs = outputs + [outputs[0]] * (MAX_OUTPUTS - len(outputs))  # placeholders, never written
    grid = (triton.cdiv(n_elements, block),)
    target.launcher(_linear_step_kernel, sample)[grid](
        sample, model_output, *ins, *outs, n_elements, float(guidance_scale or 0.0), float(clip_sample_range or 0.0),
        *_slots(coefficients, len(inputs)),
        N_IN=len(inputs), N_OUT=len(coefficients), HAS_GUIDANCE=guidance_scale is not None,
        CLIP=clip_sample_range is not None, BLOCK_SIZE=block, num_warps=num_warps,
        **target.register_cap(sample, common.MAXNREG),
    )
    return outputs
