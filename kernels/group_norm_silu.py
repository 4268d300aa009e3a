"""Fused GroupNorm (+ SiLU): statistics in fp32, affine per channel, optional SiLU, output in x's dtype
(the op ``fastdiff.ops.group_norm_silu``).

Layers (STYLE.md): private ``@triton.jit`` kernels and helpers; the host function :func:`group_norm_silu` that
validates nothing (``fastdiff.ops`` does), allocates the output, picks block sizes and launches.

A group (n, g) seen as a 2-D (rows, cols) view whose columns are adjacent in memory:
  - contiguous x, (N, C, *spatial): rows = the C/G channels, cols = HW pixels, rows HW apart;
  - channels_last x, (N, *spatial, C) in memory: rows = HW pixels, cols = the C/G channels, rows C apart.
Both are read in (BLOCK_R, BLOCK_L) tiles with unit stride along cols, and the channel of an element is its row
(contiguous) or its column (channels_last): no integer division per element.

Memory traffic:
  - single pass (the padded group fits on chip, ≤ SINGLE_PASS_MAX elements): one program per (n, g) keeps its
    group in registers: one read, one write;
  - split (larger groups): the group is cut into S chunks of whole tiles so that N·G·S programs fill the GPU.
    ``_group_norm_stats_kernel`` reads each chunk once and writes (count, mean, M2) to a small fp32 workspace;
    ``_group_norm_silu_apply_kernel`` combines the S partials of its group (Chan et al.) and reads + writes its
    chunk once. With S = 1 the apply kernel computes the statistics itself (no workspace, one launch, the second
    read of a chunk usually hits L2).
Variance: each tile's mean and M2 are computed exactly in registers (two-level, mean-shifted), then tiles and
chunks are merged with Chan's parallel formula, so a large mean offset (x = 100 + randn) loses no accuracy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels import target

# Host-side tuning knobs (module constants so a test can shrink them to reach the split path on small shapes).
SINGLE_PASS_MAX = 8192  # padded group elements kept in registers by one program (single-pass path)
SPLIT_TILE = 4096  # elements per tile in the split path
MAX_PARTIALS = 64  # most chunks (partials) per group: every apply program re-reads its group's partials
TARGET_PROGRAMS = None  # programs the split path aims for; None → 8 per SM on CUDA, 8 under the interpreter
# an explicit register budget: without one, the ptxas of Triton 3.6 (CUDA 12.8) aims at 40-64 registers for some
# tiles and spills 4-8 B; the kernels need at most 80 (docs/kernels.md). 128 × 16 warps fills the register file.
MAXNREG = 128


# --------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _tile(
    t,  # tile index inside the group, row-major over (n_tiles_r, n_tiles_l)
    n_tiles_l,  # tiles along cols
    R,  # rows of the group view
    L,  # cols of the group view
    ROW_STRIDE,  # elements between rows
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    EVEN_L: tl.constexpr,  # L % BLOCK_L == 0: no column mask, so loads along a row vectorise
):
    """Offsets (BLOCK_R, BLOCK_L) relative to the group's first element, the mask, the row and col indices and the
    number of valid elements of tile t."""
    tr = t // n_tiles_l
    tc = t - tr * n_tiles_l
    rows = tr * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tc * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    if EVEN_L:
        mask = (rows < R)[:, None]  # (BLOCK_R, 1), broadcast by load/store/where
    else:
        mask = (rows < R)[:, None] & (cols < L)[None, :]  # (BLOCK_R, BLOCK_L)
    offs = rows[:, None] * ROW_STRIDE + cols[None, :]  # (BLOCK_R, BLOCK_L)
    count = (tl.minimum(R - tr * BLOCK_R, BLOCK_R) * tl.minimum(L - tc * BLOCK_L, BLOCK_L)).to(tl.float32)
    return offs, mask, rows, cols, count


@triton.jit
def _tile_moments(
    x,  # (BLOCK_R, BLOCK_L) fp32, masked-out elements arbitrary
    mask,  # (BLOCK_R, BLOCK_L)
    count,  # valid elements, fp32 scalar > 0
):
    """Exact mean and M2 = Σ(x − mean)² of one tile held in registers (the mean-shift avoids cancellation)."""
    xm = tl.where(mask, x, 0.0)
    mean = tl.sum(tl.sum(xm, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    return mean, m2


@triton.jit
def _chunk_moments(
    Xg,  # pointer to the group's first element
    t_begin,  # first tile of the chunk
    t_end,  # one past the last tile
    n_tiles_l,
    R,
    L,
    ROW_STRIDE,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    EVEN_L: tl.constexpr,
):
    """(count, mean, M2) over tiles [t_begin, t_end) of a group: exact per tile, merged with Chan's formula."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(t_begin, t_end):
        offs, mask, _rows, _cols, t_count = _tile(t, n_tiles_l, R, L, ROW_STRIDE, BLOCK_R, BLOCK_L, EVEN_L)
        x = tl.load(Xg + offs, mask=mask, other=0.0).to(tl.float32)
        t_mean, t_m2 = _tile_moments(x, mask, t_count)
        new_count = count + t_count
        delta = t_mean - mean
        mean = mean + delta * (t_count / new_count)
        m2 = m2 + t_m2 + delta * delta * (count * t_count / new_count)
        count = new_count
    return count, mean, m2


@triton.jit
def _normalize(
    x,  # (BLOCK_R, BLOCK_L) fp32
    rows,  # (BLOCK_R,) row indices in the group view
    cols,  # (BLOCK_L,) col indices in the group view
    R,
    L,
    W,  # (C,) weight, fp32 or x's dtype (unused without HAS_WEIGHT)
    B,  # (C,) bias (unused without HAS_BIAS)
    ch0,  # first channel of the group, g · C/G
    mean,  # group mean, fp32 scalar
    rstd,  # 1 / sqrt(var + eps), fp32 scalar
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    CHANNEL_ON_ROWS: tl.constexpr,  # contiguous x: channel = row; channels_last: channel = col
):
    """y = (x − mean) · scale_c + b_c with scale_c = rstd·w_c, then SiLU; fp32. (Not x·scale + shift: with
    |mean| ≫ std, x·scale and mean·scale cancel and lose the digits the mean-shifted statistics kept.)"""
    if CHANNEL_ON_ROWS:
        ch = rows
        ch_mask = rows < R
    else:
        ch = cols
        ch_mask = cols < L
    scale = tl.where(ch_mask, rstd, 0.0)  # (BLOCK_R,) or (BLOCK_L,)
    if HAS_WEIGHT:
        scale = scale * tl.load(W + ch0 + ch, mask=ch_mask, other=0.0).to(tl.float32)
    if CHANNEL_ON_ROWS:
        y = (x - mean) * scale[:, None]
    else:
        y = (x - mean) * scale[None, :]
    if HAS_BIAS:
        shift = tl.load(B + ch0 + ch, mask=ch_mask, other=0.0).to(tl.float32)
        if CHANNEL_ON_ROWS:
            y = y + shift[:, None]
        else:
            y = y + shift[None, :]
    if ACT_SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _group_base(
    pid,  # program id over N·G
    num_groups,  # G
    SAMPLE_STRIDE,  # C · HW
    GROUP_STRIDE,  # C/G · HW (contiguous) or C/G (channels_last)
    cpg,  # C/G
):
    """Offset (int64) of group pid's first element and its first channel."""
    n = pid // num_groups
    g = pid - n * num_groups
    return n.to(tl.int64) * SAMPLE_STRIDE + g.to(tl.int64) * GROUP_STRIDE, g * cpg


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _group_norm_silu_kernel(
    X,  # (N, C, *spatial), contiguous or channels_last
    Y,  # like X
    W,  # (C,) or a dummy pointer
    B,  # (C,) or a dummy pointer
    num_groups,  # G
    cpg,  # C/G
    R,  # rows of the group view
    L,  # cols of the group view
    ROW_STRIDE,  # HW (contiguous) or C (channels_last)
    SAMPLE_STRIDE,  # C · HW
    GROUP_STRIDE,  # C/G · HW or C/G
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    CHANNEL_ON_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # ≥ R
    BLOCK_L: tl.constexpr,  # ≥ L
    EVEN_L: tl.constexpr,  # L == BLOCK_L
):
    """Single pass, grid (N·G,): the whole group is one tile in registers; one read, one write."""
    base, ch0 = _group_base(tl.program_id(0), num_groups, SAMPLE_STRIDE, GROUP_STRIDE, cpg)
    offs, mask, rows, cols, count = _tile(0, 1, R, L, ROW_STRIDE, BLOCK_R, BLOCK_L, EVEN_L)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_L)
    mean, m2 = _tile_moments(x, mask, count)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    y = _normalize(x, rows, cols, R, L, W, B, ch0, mean, rstd, HAS_WEIGHT, HAS_BIAS, ACT_SILU, CHANNEL_ON_ROWS)
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_stats_kernel(
    X,  # (N, C, *spatial), contiguous or channels_last
    WS,  # (3, N·G, S) fp32 workspace: count, mean, M2 of every chunk
    num_groups,
    cpg,
    R,
    L,
    ROW_STRIDE,
    SAMPLE_STRIDE,
    GROUP_STRIDE,
    n_tiles,  # tiles per group
    n_tiles_l,  # tiles along cols
    tiles_per_chunk,
    n_chunks,  # S
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    EVEN_L: tl.constexpr,  # L % BLOCK_L == 0
):
    """Split path, pass 1, grid (N·G, S): moments of one chunk (whole tiles) of one group → workspace."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    base, _ch0 = _group_base(pid, num_groups, SAMPLE_STRIDE, GROUP_STRIDE, cpg)
    t_begin = chunk * tiles_per_chunk
    t_end = tl.minimum(t_begin + tiles_per_chunk, n_tiles)
    count, mean, m2 = _chunk_moments(X + base, t_begin, t_end, n_tiles_l, R, L, ROW_STRIDE, BLOCK_R, BLOCK_L, EVEN_L)
    plane = tl.num_programs(0) * n_chunks
    slot = pid * n_chunks + chunk
    tl.store(WS + slot, count)
    tl.store(WS + plane + slot, mean)
    tl.store(WS + 2 * plane + slot, m2)


@triton.jit
def _group_norm_silu_apply_kernel(
    X,  # (N, C, *spatial), contiguous or channels_last
    Y,  # like X
    W,  # (C,) or a dummy pointer
    B,  # (C,) or a dummy pointer
    WS,  # (3, N·G, S) fp32 partials from _group_norm_stats_kernel (unused with FUSED_STATS)
    num_groups,
    cpg,
    R,
    L,
    ROW_STRIDE,
    SAMPLE_STRIDE,
    GROUP_STRIDE,
    n_tiles,
    n_tiles_l,
    tiles_per_chunk,
    n_chunks,  # S
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    CHANNEL_ON_ROWS: tl.constexpr,
    FUSED_STATS: tl.constexpr,  # S == 1: compute the group's moments here (no workspace, no second launch)
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    EVEN_L: tl.constexpr,  # L % BLOCK_L == 0
    BLOCK_S: tl.constexpr,  # ≥ S
):
    """Split path, pass 2, grid (N·G, S): merge the group's partials, then normalise (+ SiLU) one chunk."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    base, ch0 = _group_base(pid, num_groups, SAMPLE_STRIDE, GROUP_STRIDE, cpg)
    t_begin = chunk * tiles_per_chunk
    t_end = tl.minimum(t_begin + tiles_per_chunk, n_tiles)
    if FUSED_STATS:
        count, mean, m2 = _chunk_moments(X + base, 0, n_tiles, n_tiles_l, R, L, ROW_STRIDE, BLOCK_R, BLOCK_L, EVEN_L)
    else:
        # Chan's merge of S partials: mean = Σ nᵢ·meanᵢ / n, M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ − mean)²
        plane = tl.num_programs(0) * n_chunks
        s = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        s_mask = s < n_chunks
        slot = pid * n_chunks + s
        counts = tl.load(WS + slot, mask=s_mask, other=0.0)
        means = tl.load(WS + plane + slot, mask=s_mask, other=0.0)
        m2s = tl.load(WS + 2 * plane + slot, mask=s_mask, other=0.0)
        count = tl.sum(counts, axis=0)
        mean = tl.sum(counts * means, axis=0) / count
        d = means - mean
        m2 = tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + eps)
    for t in range(t_begin, t_end):
        offs, mask, rows, cols, _count = _tile(t, n_tiles_l, R, L, ROW_STRIDE, BLOCK_R, BLOCK_L, EVEN_L)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_L)
        y = _normalize(x, rows, cols, R, L, W, B, ch0, mean, rstd, HAS_WEIGHT, HAS_BIAS, ACT_SILU, CHANNEL_ON_ROWS)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- host
def _target_programs(x: torch.Tensor) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    if target.compiled_gpu(x):
        return 8 * target.sm_count(x)
    return 8


def _num_warps(block_elems: int) -> int:
    """About 16 elements per thread (two 16-byte loads in fp16), 1–16 warps."""
    return max(1, min(16, block_elems // 512))


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor:
    """GroupNorm (+ SiLU when activation == "silu") of x (N, C, *spatial), contiguous or channels_last.

    Validates nothing (``fastdiff.ops.group_norm_silu`` does): x is contiguous or else channels_last (NHWC /
    NDHWC strides), C % num_groups == 0, weight/bias contiguous (C,) or None. Offsets inside one sample are int32
    (C·HW < 2³¹). Returns a tensor of x's shape, dtype and memory format.
    """
    y = torch.empty_like(x)  # same strides as x (contiguous or channels_last)
    if x.numel() == 0:
        return y
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // (n * c)
    if c * hw >= target.INT32_LIMIT:  # offsets inside one sample are 32-bit in the kernels
        raise ValueError(f"group_norm_silu: one sample of x has C·HW = {c * hw} elements; the Triton kernels address "
                         f"at most 2^31 - 1 inside a sample: use backend='torch' or split the batch")
    cpg = c // num_groups
    if x.is_contiguous():  # (N, C, HW): rows = channels, cols = pixels
        rows, cols, row_stride, group_stride, channel_on_rows = cpg, hw, hw, cpg * hw, True
    else:  # channels_last, (N, HW, C) in memory: rows = pixels, cols = channels
        rows, cols, row_stride, group_stride, channel_on_rows = hw, cpg, c, cpg, False
    sample_stride = c * hw
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "ACT_SILU": activation == "silu",
        "CHANNEL_ON_ROWS": channel_on_rows,
    }
    w = weight if weight is not None else x  # dummy pointers, never read
    b = bias if bias is not None else x
    groups = n * num_groups

    block_r, block_l = triton.next_power_of_2(rows), triton.next_power_of_2(cols)
    if block_r * block_l <= SINGLE_PASS_MAX:
        target.launcher(_group_norm_silu_kernel, x)[(groups,)](
            x, y, w, b, num_groups, cpg, rows, cols, row_stride, sample_stride, group_stride, eps,
            **flags, BLOCK_R=block_r, BLOCK_L=block_l, EVEN_L=cols == block_l, num_warps=_num_warps(block_r * block_l),
            **target.register_cap(x, MAXNREG),
        )
        return y

    # split path: tiles of ≤ SPLIT_TILE elements, whole tiles per chunk, S chunks per group
    block_l = min(block_l, SPLIT_TILE)
    block_r = min(block_r, max(1, SPLIT_TILE // block_l))
    n_tiles_l = triton.cdiv(cols, block_l)
    even_l = cols % block_l == 0
    n_tiles = triton.cdiv(rows, block_r) * n_tiles_l
    chunks = max(1, min(triton.cdiv(_target_programs(x), groups), n_tiles, MAX_PARTIALS))
    tiles_per_chunk = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, tiles_per_chunk)  # every chunk holds at least one tile
    num_warps = _num_warps(block_r * block_l)
    shape_args = (num_groups, cpg, rows, cols, row_stride, sample_stride, group_stride, n_tiles, n_tiles_l,
                  tiles_per_chunk, chunks)
    if chunks == 1:
        ws = x  # unused
    else:
        ws = torch.empty((3, groups, chunks), dtype=torch.float32, device=x.device)
        target.launcher(_group_norm_stats_kernel, x)[(groups, chunks)](
            x, ws, *shape_args, BLOCK_R=block_r, BLOCK_L=block_l, EVEN_L=even_l, num_warps=num_warps,
            **target.register_cap(x, MAXNREG),
        )
    target.launcher(_group_norm_silu_apply_kernel, x)[(groups, chunks)](
        x, y, w, b, ws, *shape_args, eps, **flags, FUSED_STATS=chunks == 1,
        BLOCK_R=block_r, BLOCK_L=block_l, EVEN_L=even_l, BLOCK_S=triton.next_power_of_2(chunks), num_warps=num_warps,
        **target.register_cap(x, MAXNREG),
    )
    return y
