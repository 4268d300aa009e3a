"""Flash-attention forward in Triton: softmax(q kᵀ · scale) v with an fp32 online softmax.

One program owns BLOCK_N query rows of one (batch, head) and walks the keys in tiles of BLOCK_M, keeping a running
row maximum m, a running denominator l and an fp32 accumulator; the (N, M) score matrix only ever exists as one
(BLOCK_N, BLOCK_M) tile in registers. Full key tiles run unmasked; the last, partial tile (M = 77 text tokens, M = 1)
is masked. When M ≤ BLOCK_M that masked tile is all there is: no loop (cross-attention with 77 tokens and a 128-key
tile is one tile).

Layers (STYLE.md): the private ``_attention_kernel``; the host function :func:`attention`, which validates nothing
(``fastdiff.ops.attention`` does), allocates the output, picks block sizes and launches.

Unlike the norm kernels, q, k and v are NOT upcast to fp32 on load: ``tl.dot`` takes fp16/bf16 operands in their
native precision (tensor cores) and accumulates in fp32; the probabilities are rounded to v's dtype for the second
dot, as every flash-attention kernel does. fp32 inputs keep fp32 accuracy by default: they run on
``_attention_fp32_kernel``, exact ("ieee") dots on the CUDA cores, sliced so its registers stay bounded (correct,
not fast; fp16/bf16 are the fast path). With TF32 allowed (:func:`tf32_enabled`) fp32 runs on the tensor-core kernel
with TF32 dots (heads wider than 128: the sliced kernel's dots in TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastdiff.kernels import target

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2(e)), folded into the scale

# Under Triton's interpreter (TRITON_INTERPRET=1, read at import like Triton itself does) one small fixed config keeps
# the tests fast and skips autotuning; it still exercises several query blocks, several key tiles and a masked tail at
# the tested sizes.
_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=4, num_stages=2)
# the exact-fp32 kernel's: several head-dim slices and output-column blocks at the tested head dims (D = 40: 3 and 2)
_INTERPRET_FP32_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_DK": 16, "BLOCK_DV": 32}, num_warps=4,
                                       num_stages=2)
# FASTDIFF_AUTOTUNE=0 skips autotuning on the GPU (one heuristic config per call; cheap CUDA test runs)
_AUTOTUNE = os.environ.get("FASTDIFF_AUTOTUNE", "1") != "0"


@triton.jit
def _load(
    ptrs,  # tile of pointers
    row_mask,  # (rows,) bool
    col_mask,  # (cols,) bool
    MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """Load a 2-D tile, masking only the axes that can run past the tensor (masked elements read as 0)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attention_tile(
    acc,  # (BLOCK_N, BLOCK_D) fp32 running Σ p·v
    m_i,  # (BLOCK_N,) fp32 running row max of the log2-scaled scores
    l_i,  # (BLOCK_N,) fp32 running Σ p
    q,  # (BLOCK_N, BLOCK_D) q's dtype
    K_tile,  # K + start_m * stride_km: the first key row of this tile
    V_tile,  # V + start_m * stride_vm
    offs_m,  # (BLOCK_M,) int32 key offsets within the tile
    offs_d,  # (BLOCK_D,) int32
    m_left,  # keys left from this tile's start (≥ 1)
    stride_km, stride_kd, stride_vm, stride_vd,
    qk_scale,  # scale · log2(e)
    D: tl.constexpr,
    MASK_M: tl.constexpr,  # this tile runs past M
    MASK_D: tl.constexpr,  # D < BLOCK_D (padded head dim)
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Fold one (BLOCK_M, D) tile of keys and values into the online-softmax state."""
    mask_m = offs_m < m_left
    mask_d = offs_d < D
    k = _load(K_tile + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd, mask_m, mask_d,
              MASK_M, MASK_D)  # (BLOCK_M, BLOCK_D)
    if DOT_UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) fp32
    qk = qk * qk_scale
    if MASK_M:
        qk = tl.where(mask_m[None, :], qk, float("-inf"))
    # every tile holds at least one real key, so m_new is finite and no row sees (-inf) - (-inf)
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_N,)
    p = tl.exp2(qk - m_new[:, None])  # (BLOCK_N, BLOCK_M) fp32, masked keys give 0
    alpha = tl.exp2(m_i - m_new)  # rescales the old state; 0 on the first tile (m_i = -inf)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load(V_tile + offs_m[:, None] * stride_vm + offs_d[None, :] * stride_vd, mask_m, mask_d,
              MASK_M, MASK_D)  # (BLOCK_M, BLOCK_D)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)  # (BLOCK_N, BLOCK_M) rounded to v's dtype for the tensor-core dot
    if DOT_UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _head(
    P,  # base pointer of a (B, H, seq, D) tensor
    stride_b,  # batch stride in units of ALIGN elements
    stride_h,  # head stride in units of ALIGN elements
    stride_s,  # sequence stride in units of ALIGN elements
    pid_bh,  # b · H + h
    H,
    ALIGN: tl.constexpr,
):
    """(P moved to the start of (batch, head) pid_bh with int64 offsets, the sequence stride in elements). The b, h and
    seq strides arrive divided by ALIGN and are multiplied back here: that tells the compiler rows start ALIGN
    elements apart, so heads of D = 40 (row stride 40, not a multiple of 16) still load as 16-byte vectors."""
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    return P + off_b * (stride_b * ALIGN) + off_h * (stride_h * ALIGN), stride_s * ALIGN


# H, N and M are not specialised (N % 16, M == 1, ...): one compiled kernel per dtype, head dim and config serves every
# sequence length, which keeps first-call compile (and autotune) time down
@triton.jit(do_not_specialize=["H", "N", "M", "BH_START"])
def _attention_kernel(
    Q,  # (B, H, N, D) any strides
    K,  # (B, H, M, D) any strides
    V,  # (B, H, M, D) any strides
    O,  # (B, H, N, D) output, q's dtype
    stride_qb, stride_qh, stride_qn, stride_qd,  # b, h, seq strides in units of ALIGN elements; d in elements
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H,  # heads
    N,  # query length
    M,  # key/value length
    BH_START,  # the first (batch, head) of this launch: B·H beyond the grid's 65,535 runs in slices
    qk_scale,  # scale · log2(e), fp32
    D: tl.constexpr,  # head dim
    BLOCK_D: tl.constexpr,  # next power of two ≥ D (≥ 16)
    MASK_D: tl.constexpr,  # D < BLOCK_D
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, None (the default) for fp16/bf16
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16: dot in fp32 on exactly upcast operands (see host)
    ALIGN: tl.constexpr,  # largest power of two ≤ 16 dividing every b, h, seq stride
    BLOCK_N: tl.constexpr,  # query rows per program
    BLOCK_M: tl.constexpr,  # keys per tile
):
    # grid: (cdiv(N, BLOCK_N), B * H); neighbouring programs share one (b, h), so its K/V stay in L2
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + BH_START
    Q, stride_qn = _head(Q, stride_qb, stride_qh, stride_qn, pid_bh, H, ALIGN)
    K, stride_km = _head(K, stride_kb, stride_kh, stride_km, pid_bh, H, ALIGN)
    V, stride_vm = _head(V, stride_vb, stride_vh, stride_vm, pid_bh, H, ALIGN)
    O, stride_on = _head(O, stride_ob, stride_oh, stride_on, pid_bh, H, ALIGN)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_n = offs_n < N
    mask_d = offs_d < D

    # rows past N load as 0 and are never stored
    q = _load(Q + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask_n, mask_d,
              True, MASK_D)  # (BLOCK_N, BLOCK_D)
    if DOT_UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # full key tiles, unmasked along M
    m_full = (M // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        acc, m_i, l_i = _attention_tile(
            acc, m_i, l_i, q, K + start_m * stride_km, V + start_m * stride_vm, offs_m, offs_d, M - start_m,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, D, False, MASK_D, DOT_PRECISION, DOT_UPCAST)
    # the partial last tile (all of it when M < BLOCK_M)
    if m_full < M:
        acc, m_i, l_i = _attention_tile(
            acc, m_i, l_i, q, K + m_full * stride_km, V + m_full * stride_vm, offs_m, offs_d, M - m_full,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, D, True, MASK_D, DOT_PRECISION, DOT_UPCAST)

    o = acc / l_i[:, None]  # l_i ≥ 1: the row max contributes exp2(0)
    o_ptrs = O + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["H", "N", "M", "BH_START"])
def _attention_fp32_kernel(
    Q, K, V, O,  # as _attention_kernel, all fp32
    stride_qb, stride_qh, stride_qn, stride_qd,  # b, h, seq strides in units of ALIGN elements; d in elements
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, M,
    BH_START,  # as _attention_kernel
    qk_scale,  # scale · log2(e)
    D: tl.constexpr,  # head dim
    ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr,  # query rows per program
    BLOCK_M: tl.constexpr,  # keys per tile
    BLOCK_DK: tl.constexpr,  # head-dim slice per step of the q·k dot
    BLOCK_DV: tl.constexpr,  # output columns per program (grid axis 2)
    DOT_PRECISION: tl.constexpr,  # "ieee" (exact fp32), or "tf32" when allowed and the head is too wide for the
    # tensor-core kernel
):
    """Exact fp32 attention for the CUDA cores. An fp32 ("ieee") dot runs as FMAs, and each thread then holds its
    rows of the left operand and its columns of the right one over the whole reduction: with the head dim as the
    reduction that is (rows + cols) · D registers, which spills at D ≥ 40. So here q·kᵀ is summed over BLOCK_DK-wide
    slices of the head dim (q and k slices re-read from L1/L2 for each key tile), and each program writes BLOCK_DV
    output columns (grid axis 2), recomputing the scores for each slice of columns: registers stay bounded at any D,
    at the price of cdiv(D, BLOCK_DV) passes over q·kᵀ. fp16/bf16 (tensor cores) are the fast path."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + BH_START
    pid_dv = tl.program_id(2)
    Q, stride_qn = _head(Q, stride_qb, stride_qh, stride_qn, pid_bh, H, ALIGN)
    K, stride_km = _head(K, stride_kb, stride_kh, stride_km, pid_bh, H, ALIGN)
    V, stride_vm = _head(V, stride_vb, stride_vh, stride_vm, pid_bh, H, ALIGN)
    O, stride_on = _head(O, stride_ob, stride_oh, stride_on, pid_bh, H, ALIGN)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_dk = tl.arange(0, BLOCK_DK)  # (BLOCK_DK,)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)  # (BLOCK_DV,)
    mask_n = offs_n < N
    mask_dv = offs_dv < D

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        keys = start_m + offs_m
        mask_m = keys < M
        qk = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_DK):
            dk = d0 + offs_dk
            mask_dk = dk < D
            q = tl.load(Q + offs_n[:, None] * stride_qn + dk[None, :] * stride_qd,
                        mask=mask_n[:, None] & mask_dk[None, :], other=0.0)  # (BLOCK_N, BLOCK_DK)
            k = tl.load(K + keys[:, None] * stride_km + dk[None, :] * stride_kd,
                        mask=mask_m[:, None] & mask_dk[None, :], other=0.0)  # (BLOCK_M, BLOCK_DK)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=DOT_PRECISION)
        qk = tl.where(mask_m[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds at least one real key
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + keys[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                    mask=mask_m[:, None] & mask_dv[None, :], other=0.0)  # (BLOCK_M, BLOCK_DV)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + offs_n[:, None] * stride_on + offs_dv[None, :] * stride_od, o,
             mask=mask_n[:, None] & mask_dv[None, :])


# ---------------------------------------------------------------------------------------------------- autotuning
def _keep(conf: triton.Config) -> bool:
    """Static filter: 8 warps (two warp groups) on 128×(≥64) tiles or on 64-row tiles (for wide heads), 4 warps
    only on tiles up to 128×64, 4 stages only on short key tiles, 32-key tiles only with ≤ 64 query rows (short M,
    wide heads), and one 32×32 two-stage tile as the fallback that fits even fp32 at D = 256."""
    bn, bm = conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_M"]
    if bn == 32:  # 4 warps, or 8 for wide heads on sm_80 (fewer registers per thread)
        return bm == 32 and conf.num_stages == 2
    if conf.num_warps == 8 and bn == 128 and bm < 64:
        return False
    if conf.num_warps == 4 and bn * bm > 128 * 64:
        return False
    if conf.num_stages == 4 and bm > 64:
        return False
    return bm != 32 or bn <= 64


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bn in (32, 64, 128)
    for bm in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]
_CONFIGS = [c for c in _CONFIGS if _keep(c)]


_SMEM_BYTES = 160 * 1024  # shared-memory budget per program: fits an A100 (164 KiB), leaves room on Hopper (227 KiB)
# smaller budgets of other generations (per-block maximum, opt-in): sm_86/89 99 KiB, sm_75 64 KiB
_SMEM_BYTES_BY_ARCH = {75: 64 * 1024, 86: 96 * 1024, 89: 96 * 1024}


def _smem_budget(arch: int | None) -> int:
    """Shared memory one program may use on compute capability ``arch`` (None: the A100/H100 budget)."""
    if arch is None or arch in (80, 87) or arch >= 90:
        return _SMEM_BYTES
    return _SMEM_BYTES_BY_ARCH.get(arch, 64 * 1024 if arch < 80 else 96 * 1024)
_ACC_REGS = 96  # fp32 accumulator registers per thread, at most (128 spilled in sm_90 builds at D = 128 and 256)


def _fits(conf: triton.Config, block_d: int, itemsize: int, arch: int | None = None) -> bool:
    """Rough resource estimate: the q tile plus num_stages buffers of k and v in shared memory, and the fp32
    accumulator spread over the threads. (The autotuner also skips configs that fail to compile for lack of
    resources; this keeps it from compiling them at all.)"""
    bn, bm = conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_M"]
    smem = itemsize * block_d * (bn + 2 * bm * conf.num_stages)
    regs = bn * block_d // (32 * conf.num_warps)
    return smem <= _smem_budget(arch) and regs <= _ACC_REGS


def _fits_arch(conf: triton.Config, block_d: int, itemsize: int, arch: int | None) -> bool:
    """Register rules per GPU generation, from what ptxas reports for every config (docs/kernels.md, written by
    ``python -m fastdiff.kernels.compile_check --full``, which also checks that no choosable config spills).

    sm_90 (wgmma reads k and v from shared memory): the fp32 scores and accumulator, (BLOCK_N·(BLOCK_D + BLOCK_M))
    values over the threads, at most 96 per thread (128 spills at D = 128 or sits at 248 registers). sm_80 (mma.sync
    holds every operand in registers): at D > 64 every 4-warp config with 64 or more rows spills, so 8 warps or
    32-row tiles (not 64×32); at D > 128 only the 32×32 tile on 8 warps stays clear. TF32 counts its head dim twice
    (fp32 operands). None (the interpreter): no rule."""
    if arch is None:
        return True
    bn, bm, warps = conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_M"], conf.num_warps
    block_d = block_d * itemsize // 2  # TF32 (fp32 operands) holds twice the bytes of fp16 per head-dim column
    if arch >= 90:  # TF32 past D = 64 also wants 8 warps (32×32 on 4 warps spills 8 B at D = 80 and 128)
        return bn * (block_d + bm) <= 96 * 32 * warps and (itemsize < 4 or block_d <= 128 or warps == 8)
    if block_d > 128:
        return bn == 32 and bm == 32 and warps == 8
    if block_d > 64:  # 64×32 on 8 warps sits at 255 registers and spills 12 B at D = 80 with Triton 3.6
        return bm <= 64 and (warps == 8 or bn == 32) and (bn, bm) != (64, 32)
    return True


def _candidates(configs, m: int, block_d: int, itemsize: int, arch: int | None = None) -> list:
    """The fp16/bf16 (and TF32) configs worth trying for one call on a GPU of compute capability ``arch``: no key
    tile longer than M needs, within the resource estimate and the arch's register rule; 32-row tiles, 32-key tiles
    and 8 warps on 64 rows only for short M or wide heads (D > 128), or when nothing else fits."""
    m_tile = max(32, triton.next_power_of_2(m))
    wide = block_d > 128
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= m_tile and _fits(c, block_d, itemsize, arch)
               and _fits_arch(c, block_d, itemsize, arch)]
    # the last resort when nothing fits: the smallest tile the arch's register rule allows (else the smallest)
    last = fitting or [c for c in configs if _fits_arch(c, block_d, itemsize, arch)] or configs
    smallest = min(last, key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"], c.num_stages))
    preferred = [
        c for c in fitting
        if c.kwargs["BLOCK_N"] != 32
        and (c.kwargs["BLOCK_M"] != 32 or m_tile == 32 or wide)
        and (c.kwargs["BLOCK_N"] != 64 or c.num_warps == 4 or wide)
    ]
    # never empty: the smallest config (32×32, 2 stages) is the last resort
    return preferred or fitting or [smallest]


def _prune(configs, named_args, **kwargs):
    """``early_config_prune`` hook of the autotuner."""
    args = {**named_args, **kwargs}
    return _candidates(configs, args["M"], args["BLOCK_D"], args["Q"].element_size(), target.arch(args["Q"]))


def _fp32_config(d: int) -> triton.Config:
    """Exact fp32 (the CUDA-core kernel), no tuning: 32×32 tiles, 16-wide head-dim slices, up to 64 output columns
    per program (fewer score passes; ≤ 128 registers, no spill at any D ≤ 160 on sm_80 and sm_90)."""
    block_dv = min(64, max(16, triton.next_power_of_2(d)))
    return triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_DK": 16, "BLOCK_DV": block_dv}, num_warps=4,
                         num_stages=2)


def _default_config(m: int, block_d: int, itemsize: int, arch: int | None = None) -> triton.Config:
    """The config used without autotuning (FASTDIFF_AUTOTUNE=0): the largest tile that fits, 3 stages if it can."""
    return max(
        _candidates(_CONFIGS, m, block_d, itemsize, arch),
        key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages == 3),
    )


_attention_kernel_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["N", "M", "BLOCK_D"],  # dtypes are part of the key too
    prune_configs_by={"early_config_prune": _prune},
)(_attention_kernel)


# ---------------------------------------------------------------------------------------------------- host function
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: triton.Config | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v. q: (B, H, N, D); k, v: (B, H, M, D), any strides → (B, H, N, D) contiguous, q's dtype.

    ``config`` forces one ``triton.Config`` (tests use it to check every tuned config): BLOCK_N, BLOCK_M, warps,
    stages for the tensor-core kernel (fp16/bf16, TF32 up to D = 128); for the sliced fp32 kernel (exact fp32, TF32
    past D = 128) BLOCK_DK and BLOCK_DV too (see :func:`_fp32_config`). None means the interpreter's fixed config,
    the autotuner, or with FASTDIFF_AUTOTUNE=0 a heuristic one. Validates nothing (``fastdiff.ops.attention`` does).
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    # a data pointer off a 16-byte boundary (an offset view) rules out 16-byte vector loads and cp.async for the whole
    # kernel, and such builds spill (sm_90, 344-844 B): an aligned copy costs one pass over that tensor, O(seq·D),
    # against the O(N·M·D) of attention, and keeps a single specialisation per config
    # (while traced for torch.compile there is no pointer to read: inductor copies misaligned graph inputs itself)
    traced = target.tracing(q)
    if not traced:
        q, k, v = (t if t.data_ptr() % 16 == 0 else _aligned_copy(t) for t in (q, k, v))
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    strides = [t.stride() for t in (q, k, v, o)]
    _check_int32_span(strides, (N, M, M, N), D)
    # the largest power of two ≤ 16 dividing every b, h, seq stride (the kernel multiplies them back in int32);
    # 1 when a stride is ≥ 2³¹ (passed as is, it is then a 64-bit argument)
    align = 16 if all(abs(s) < target.INT32_LIMIT for st in strides for s in st[:3]) else 1
    while align > 1 and any(s % align for st in strides for s in st[:3]):
        align //= 2
    head = (q, k, v, o, *(x for st in strides for x in (st[0] // align, st[1] // align, st[2] // align, st[3])),
            H, N, M)
    tail = (float(scale) * _LOG2E,)
    max_bh = target.MAX_GRID_Y  # B·H is grid axis 1
    bh_slices = [(start, min(max_bh, B * H - start)) for start in range(0, B * H, max_bh)]
    block_d = max(16, triton.next_power_of_2(D))
    arch = target.arch(q)
    tf32 = q.dtype == torch.float32 and tf32_enabled() and (arch is None or arch >= 80)  # TF32 cores: sm_80 on
    if q.dtype == torch.float32 and (not tf32 or block_d > _TF32_MAX_BLOCK_D):
        for start, count in bh_slices:
            _launch_fp32((*head, start, *tail), count, N, D, align, config, "tf32" if tf32 else "ieee")
        return o
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, unsupported there), so
    # under it bf16 operands are upcast to fp32 first: exact for q, k, v and for p once rounded to bf16, with fp32
    # accumulation, i.e. the compiled bf16 dot's numbers up to summation order. (The interpreter rounds fp32 → bf16
    # toward zero where the GPU rounds to nearest, so interpreted bf16 errors are about twice the GPU's.)
    upcast = target.INTERPRET and q.dtype == torch.bfloat16  # the interpreter runs it (planned launches too)
    # fp32 here only with TF32 allowed (tf32_enabled): tensor cores on operands rounded to 10 mantissa bits
    precision = "ieee" if upcast else ("tf32" if q.dtype == torch.float32 else None)
    meta = {"D": D, "BLOCK_D": block_d, "MASK_D": block_d != D, "DOT_PRECISION": precision, "DOT_UPCAST": upcast,
            "ALIGN": align}
    if config is None and target.interpreting():  # every launch is interpreted, CUDA tensors included: never tune
        config = _INTERPRET_CONFIG
    elif config is None and traced:
        # traced for torch.compile: one fixed config per shape in the graph, the autotuner's pick if it has tuned
        # this shape in eager mode, else the heuristic default (inductor does not run fastdiff's config pruning)
        config = _tuned_config(N, M, block_d, q.dtype) or _default_config(M, block_d, q.element_size(), arch)
    elif config is None and not _AUTOTUNE:
        config = _default_config(M, block_d, q.element_size(), arch)
    elif config is None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        # never benchmark inside a user's CUDA-graph capture: the tuned config if this shape was seen, else the default
        config = _tuned_config(N, M, block_d, q.dtype) or _default_config(M, block_d, q.element_size(), arch)
    for start, count in bh_slices:
        args = (*head, start, *tail)
        if config is None:
            def grid(cfg, count=count):
                return (triton.cdiv(N, cfg["BLOCK_N"]), count)

            _attention_kernel_tuned[grid](*args, **meta)
        else:
            grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), count)
            target.launcher(_attention_kernel, q)[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                                        num_stages=config.num_stages)
    return o


def _check_int32_span(strides, lengths, d: int) -> None:
    """Offsets inside one (batch, head) are 32-bit in the kernels: each of q, k, v, o must span < 2³¹ elements there
    (a ValueError naming the tensor, before any launch; the reference path has no such limit)."""
    for name, st, n in zip(("q", "k", "v", "output"), strides, lengths):
        span = (n - 1) * abs(st[2]) + (d - 1) * abs(st[3])
        if span >= target.INT32_LIMIT:
            raise ValueError(f"attention: one (batch, head) of {name} spans {span + 1} elements (sequence {n} × "
                             f"stride {st[2]}); the Triton kernel addresses at most 2^31 - 1 inside a head: use "
                             f"backend='torch' or split the sequence")


def _tuned_config(n: int, m: int, block_d: int, dtype: torch.dtype) -> triton.Config | None:
    """The autotuner's choice for this call if it has made one (its cache key: N, M, BLOCK_D, then the dtype of each
    tensor argument), else None."""
    cache = getattr(_attention_kernel_tuned, "cache", {})
    return cache.get((n, m, block_d, *(str(dtype),) * 4))


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in a fresh (aligned) allocation."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


# TF32 on the tensor-core kernel up to this padded head dim; wider fp32 heads spill there (sm_90, 32×32 tiles on 8
# warps: 500 B) and take the sliced fp32 kernel's dots in TF32 instead
_TF32_MAX_BLOCK_D = 128


def tf32_enabled() -> bool:
    """fp32 attention on TF32 tensor cores only when asked for, the way torch's own fp32 matmuls are: TF32 for CUDA
    matmuls (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or the older
    ``torch.set_float32_matmul_precision("high")``). TF32 rounds q, k, p and v to 10 mantissa bits (relative error
    ≈ 2⁻¹¹ per operand) with fp32 accumulation. The default keeps exact fp32."""
    matmul = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    if matmul is None:  # torch before the fp32_precision settings (2.9)
        return torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":  # not set for CUDA matmuls: the backends-wide setting decides
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return matmul == "tf32"


def _launch_fp32(args, bh: int, n: int, d: int, align: int, config: triton.Config | None, precision: str) -> None:
    if config is None:
        config = _INTERPRET_FP32_CONFIG if target.interpreting() else _fp32_config(d)
    kw = config.kwargs
    grid = (triton.cdiv(n, kw["BLOCK_N"]), bh, triton.cdiv(d, kw["BLOCK_DV"]))
    target.launcher(_attention_fp32_kernel, args[0])[grid](*args, D=d, ALIGN=align, **kw, DOT_PRECISION=precision,
                                                           num_warps=config.num_warps, num_stages=config.num_stages)
