"""fastdiff.ops.group_norm_silu: (a) the Triton kernel (interpreter on CPU, compiled on CUDA) vs the reference,
(b) the reference vs GroupNorm + SiLU written out by hand in float64, the split-reduction path, a large mean offset,
channels_last, and bad input. The naive formula here is written fresh (mean/variance per group), not taken from
fastdiff.reference.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_rel_close, cap_cpu_isa, poison_empty

import fastdiff
from fastdiff import ops, reference

# Under the interpreter exp(-y) of a padding lane or a very negative y overflows to inf in numpy; SiLU is still 0.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

SHAPES = [  # (shape, num_groups)
    ((1, 8, 4, 4), 4),  # N=1
    ((2, 6, 7, 9), 3),  # HW = 63, not a multiple of the block
    ((2, 4, 5, 5), 4),  # C == num_groups
    ((3, 8, 10), 2),  # 3-D (N, C, L)
    ((5, 12), 4),  # 2-D (N, C): HW = 1
    ((1, 4, 2, 3, 5), 2),  # 5-D (N, C, D, H, W)
]
CL_SHAPES = [
    ((2, 8, 5, 7), 4),  # channels_last, C/G = 2, HW = 35
    ((1, 12, 4, 4), 3),  # channels_last, N=1, C/G = 4 (a power of two: no column mask)
    ((2, 6, 2, 3, 3), 2),  # channels_last_3d
]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]
TOL_VS_FLOAT64 = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _path(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "interpreter"


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)


def _inputs(shape, dtype, device, *, channels_last=False, affine=(True, True), param_dtype=torch.float32,
            offset=0.0, seed=0):
    """Fresh random x (N, C, *spatial) and optional (C,) weight/bias; weight near 1 so the output is not tiny."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(shape, generator=g)).to(dtype)
    if channels_last:
        x = _channels_last(x)
    c = shape[1]
    w = (1.0 + 0.5 * torch.randn(c, generator=g)).to(param_dtype).to(device) if affine[0] else None
    b = (0.5 * torch.randn(c, generator=g)).to(param_dtype).to(device) if affine[1] else None
    return x.to(device), w, b


def _naive(x, num_groups, weight, bias, eps, activation):
    """GroupNorm then SiLU in float64, from the definition: (x − mean_g) / sqrt(var_g + eps) · w_c + b_c."""
    n, c = x.shape[:2]
    xg = x.detach().cpu().double().reshape(n, num_groups, -1)  # (N, G, C/G · HW), logical order
    mean = xg.mean(dim=2, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.detach().cpu().double().reshape(per_channel)
    if bias is not None:
        y = y + bias.detach().cpu().double().reshape(per_channel)
    if activation == "silu":
        y = y / (1.0 + torch.exp(-y))
    return y


def _reference(x, num_groups, weight, bias, eps, activation):
    cpu = (lambda t: None if t is None else t.cpu())
    return reference.group_norm_silu(x.cpu(), num_groups, cpu(weight), cpu(bias), eps, activation)


def _kernel(monkeypatch, x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu"):
    """The Triton path through the public op, on NaN-poisoned outputs, checking that the kernel really ran."""
    poison_empty(monkeypatch)
    fastdiff.reset_counts()
    y = ops.group_norm_silu(x, num_groups, weight, bias, eps, activation=activation, backend="triton")
    assert fastdiff.counts() == {("group_norm_silu", _path(x.device)): 1}
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == x.stride(), f"memory format changed: strides {y.stride()} != {x.stride()}"
    return y


def _force_split(monkeypatch, *, target_programs: int) -> None:
    """Shrink the kernel's thresholds so small shapes take the split-reduction path (S = target_programs / (N·G))."""
    gn = pytest.importorskip("fastdiff.kernels.group_norm_silu")
    monkeypatch.setattr(gn, "SINGLE_PASS_MAX", 16)
    monkeypatch.setattr(gn, "SPLIT_TILE", 32)
    monkeypatch.setattr(gn, "TARGET_PROGRAMS", target_programs)


# --------------------------------------------------------------------------------------------- (a) kernel vs reference
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,num_groups", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_kernel_matches_reference(device, monkeypatch, shape, num_groups, dtype, tol):
    x, w, b = _inputs(shape, dtype, device)
    ref = _reference(x, num_groups, w, b, 1e-5, "silu")
    out = _kernel(monkeypatch, x, num_groups, w, b)
    assert_rel_close(out, ref, tol, f"group_norm_silu {dtype} {shape} G={num_groups}")


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,num_groups", CL_SHAPES, ids=[str(s) for s, _ in CL_SHAPES])
def test_kernel_channels_last(device, monkeypatch, shape, num_groups, dtype, tol):
    x, w, b = _inputs(shape, dtype, device, channels_last=True, param_dtype=dtype)
    assert _is_channels_last(x) and not x.is_contiguous()
    ref = _reference(x, num_groups, w, b, 1e-5, "silu")
    out = _kernel(monkeypatch, x, num_groups, w, b)
    assert _is_channels_last(out)
    assert_rel_close(out, ref, tol, f"channels_last {dtype} {shape}")


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no_affine", "weight", "bias", "weight_bias"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16], ids=["fp32_params", "fp16_params"])
def test_kernel_affine_and_activation(device, monkeypatch, affine, activation, param_dtype):
    if param_dtype == torch.float16 and affine == (False, False):
        pytest.skip("no parameters to give a dtype")
    x, w, b = _inputs((2, 6, 5, 3), torch.float16, device, affine=affine, param_dtype=param_dtype)
    ref = _reference(x, 3, w, b, 1e-3, activation)
    out = _kernel(monkeypatch, x, 3, w, b, eps=1e-3, activation=activation)
    assert_rel_close(out, ref, 1e-3, f"affine={affine} activation={activation}")
    if activation is None and not any(affine):  # plain GroupNorm: every group has mean 0 and variance ≈ 1
        groups = out.double().reshape(2, 3, -1)
        assert groups.mean(2).abs().max() < 1e-2 and (groups.var(2, unbiased=False) - 1).abs().max() < 2e-2


def test_kernel_empty_and_degenerate_layouts(device, monkeypatch):
    """An empty batch launches nothing; (N, C, H, 1) in channels_last is not contiguous and takes the NHWC path."""
    empty = torch.randn(0, 8, 4, 4, device=device)
    assert _kernel(monkeypatch, empty, 4).shape == empty.shape
    x, w, b = _inputs((2, 8, 5, 1), torch.float32, device, channels_last=True)
    assert not x.is_contiguous()
    assert_rel_close(_kernel(monkeypatch, x, 4, w, b), _reference(x, 4, w, b, 1e-5, "silu"), 1e-5, "(2, 8, 5, 1) NHWC")


# --------------------------------------------------------------------------------------------- split reduction
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("target_programs", [4, 1], ids=["partials", "one_chunk"])
def test_kernel_split_path(device, monkeypatch, channels_last, target_programs):
    """Groups far above the (shrunk) single-pass threshold, 4 tiles of ≤ 32 elements each: 2 chunks of 2 tiles per
    group merged from a workspace (partials), or one program per group looping twice over its tiles (one_chunk)."""
    _force_split(monkeypatch, target_programs=target_programs)
    x, w, b = _inputs((1, 4, 7, 9), torch.float32, device, channels_last=channels_last)  # group: 2 × 63 elements
    ref = _reference(x, 2, w, b, 1e-5, "silu")
    out = _kernel(monkeypatch, x, 2, w, b)
    assert_rel_close(out, ref, 1e-5, f"split path channels_last={channels_last} programs={target_programs}")


def test_kernel_split_path_default_threshold(device, monkeypatch):
    """A group above the real single-pass threshold (2 × 96² = 18432 elements), N=1, bf16, real block sizes."""
    x, w, b = _inputs((1, 4, 96, 96), torch.bfloat16, device)
    ref = _reference(x, 2, w, b, 1e-5, "silu")
    out = _kernel(monkeypatch, x, 2, w, b)
    assert_rel_close(out, ref, 8e-3, "split path at the default threshold")


@pytest.mark.parametrize("split", [False, True], ids=["single_pass", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_large_mean_offset(device, monkeypatch, channels_last, split):
    """x = 100 + randn in fp32, and one constant group (variance exactly 0): no cancellation, no NaN."""
    if split:
        _force_split(monkeypatch, target_programs=4)
    x, w, b = _inputs((1, 4, 6, 5), torch.float32, device, channels_last=channels_last, offset=100.0)
    x[0, 2:4] = 100.0  # group 1 is constant
    exact = _naive(x, 2, w, b, 1e-5, "silu")
    out = _kernel(monkeypatch, x, 2, w, b)
    assert_rel_close(out, exact, TOL_VS_FLOAT64[torch.float32], "kernel vs float64, mean offset 100")


# --------------------------------------------------------------------------------------------- (b) reference vs naive
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,num_groups", SHAPES + CL_SHAPES, ids=[str(s) for s, _ in SHAPES + CL_SHAPES])
def test_reference_matches_naive(shape, num_groups, dtype, channels_last):
    if channels_last and len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4-D or 5-D input")
    x, w, b = _inputs(shape, dtype, "cpu", channels_last=channels_last)
    out = reference.group_norm_silu(x, num_groups, w, b, 1e-5, "silu")
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_rel_close(out, _naive(x, num_groups, w, b, 1e-5, "silu"), TOL_VS_FLOAT64[dtype], "reference vs float64")


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_large_mean_offset(offset, channels_last, dtype):
    """torch's CPU channels_last GroupNorm alone loses every digit at x = 1000 + randn; the reference must not."""
    x, w, b = _inputs((2, 16, 8, 8), dtype, "cpu", channels_last=channels_last, offset=offset)
    for activation in ("silu", None):
        out = reference.group_norm_silu(x, 4, w, b, 1e-5, activation)
        exact = _naive(x, 4, w, b, 1e-5, activation)
        tol = 5e-4 if dtype == torch.float32 else TOL_VS_FLOAT64[dtype]  # fp32: |mean|·2⁻²⁴ of rounding at 1000
        assert_rel_close(out, exact, tol, f"reference, offset {offset}, activation {activation}")


def test_backend_torch_runs_the_reference():
    """backend="torch" runs the reference (the CPU users' path) through the public op, and it is right."""
    x, w, b = _inputs((2, 8, 4, 4), torch.float32, "cpu")
    fastdiff.reset_counts()
    out = ops.group_norm_silu(x, 4, w, b, backend="torch")
    assert fastdiff.counts() == {("group_norm_silu", "torch"): 1}
    assert_rel_close(out, _naive(x, 4, w, b, 1e-5, "silu"), 2e-6)


# --------------------------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(2, 8, 4, 4)
    w = torch.ones(8)
    return [
        ("x_not_tensor", {"x": [[1.0]], "num_groups": 1}, TypeError, "x must be a torch.Tensor"),
        ("x_int", {"x": torch.ones(2, 8, 4, 4, dtype=torch.int32), "num_groups": 4}, TypeError, "x must have dtype"),
        ("x_float64", {"x": x.double(), "num_groups": 4}, TypeError, "x must have dtype"),
        ("x_rank_1", {"x": torch.randn(8), "num_groups": 4}, ValueError, "x must have shape"),
        ("groups_not_divisor", {"x": x, "num_groups": 3}, ValueError, "num_groups must be a positive divisor of C=8"),
        ("groups_zero", {"x": x, "num_groups": 0}, ValueError, "num_groups"),
        ("groups_float", {"x": x, "num_groups": 4.0}, TypeError, "num_groups must be an int"),
        ("weight_shape", {"x": x, "num_groups": 4, "weight": torch.ones(4)}, ValueError, r"weight must have shape"),
        ("bias_shape", {"x": x, "num_groups": 4, "bias": torch.ones(8, 1)}, ValueError, r"bias must have shape \(8,\)"),
        ("weight_not_tensor", {"x": x, "num_groups": 4, "weight": [1.0] * 8}, TypeError, "weight must be a torch"),
        ("bias_float64", {"x": x, "num_groups": 4, "bias": w.double()}, TypeError, "bias must have dtype"),
        ("weight_fp16_for_fp32_x", {"x": x, "num_groups": 4, "weight": w.half()}, TypeError, "weight must have dtype"),
        ("weight_other_device", {"x": x, "num_groups": 4, "weight": torch.ones(8, device="meta")}, ValueError,
         "weight is on meta"),
        ("bias_other_device", {"x": x.to("meta"), "num_groups": 4, "bias": w}, ValueError, "bias is on cpu"),
        ("eps_zero", {"x": x, "num_groups": 4, "eps": 0.0}, ValueError, "eps must be > 0"),
        ("eps_negative", {"x": x, "num_groups": 4, "eps": -1e-5}, ValueError, "eps must be > 0"),
        ("eps_string", {"x": x, "num_groups": 4, "eps": "1e-5"}, TypeError, "eps must be a real number"),
        ("eps_nan", {"x": x, "num_groups": 4, "eps": float("nan")}, ValueError, "eps must be finite"),
        ("activation", {"x": x, "num_groups": 4, "activation": "relu"}, ValueError, "activation must be one of"),
        ("backend", {"x": x, "num_groups": 4, "backend": "cuda"}, ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case):
    _, kwargs, error, match = case
    fastdiff.reset_counts()
    with pytest.raises(error, match=match):
        ops.group_norm_silu(**kwargs)
    assert fastdiff.counts() == {}, "an op ran before the input was rejected"


def test_plain_group_norm_module_has_no_activation():
    """fastdiff.nn.GroupNorm: the fused op without SiLU, with torch.nn.GroupNorm's parameters."""
    from fastdiff.nn import GroupNorm

    norm = GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 8, 5, 5) * 4 + 2
    want = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-4, atol=1e-4)
    assert (norm(x) < 0).any()  # SiLU would bound the output below by -0.28
    assert sorted(norm.state_dict()) == ["bias", "weight"] and "activation" not in repr(norm)


# --------------------------------------------------------------------------------------------- (c) native C++ kernel
# The CPU's default path where the extension is built (csrc/group_norm_silu_cpu.cpp), checked on the same tables as
# the Triton kernel, against the reference and against float64, on every instruction-set level this CPU runs.
# FASTDIFF_CPU_ISA caps: "as_set" leaves the variable as the environment has it (unset: this CPU's best level; the
# ISA matrix runs these tests under each of its caps), then lower levels.
ISAS = ["as_set", "avx2", "generic"]


def _native_ready():
    from fastdiff import native

    if not native.has_kernel("group_norm_silu_native", "cpu"):
        pytest.skip(f"the native extension has no group_norm_silu kernel here: {native.status()}")


def _native(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu"):
    """The native path through the public op, checking that it ran and kept shape, dtype and memory format."""
    fastdiff.reset_counts()
    y = ops.group_norm_silu(x, num_groups, weight, bias, eps, activation=activation, backend="native")
    assert fastdiff.counts() == {("group_norm_silu", "native"): 1}
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.stride() == x.stride(), f"memory format changed: strides {y.stride()} != {x.stride()}"
    return y


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    _native_ready()
    return cap_cpu_isa(monkeypatch, request.param)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,num_groups", SHAPES + CL_SHAPES, ids=[str(s) for s, _ in SHAPES + CL_SHAPES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_native_matches_reference(isa, shape, num_groups, dtype, tol, channels_last):
    if channels_last and len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4-D or 5-D input")
    x, w, b = _inputs(shape, dtype, "cpu", channels_last=channels_last, seed=len(shape))
    out = _native(x, num_groups, w, b)
    assert_rel_close(out, _reference(x, num_groups, w, b, 1e-5, "silu"), tol, f"native ({isa}) vs reference")
    assert_rel_close(out, _naive(x, num_groups, w, b, 1e-5, "silu"), TOL_VS_FLOAT64[dtype], "native vs float64")


@pytest.mark.parametrize("shape,num_groups,channels_last", [
    ((2, 4, 70, 70), 2, False),    # a group of 9800 elements: three statistics blocks, the last partial
    ((1, 6, 33, 31), 3, False),    # 2046-element groups: a block with a lane tail
    ((2, 512, 9, 9), 32, True),    # channels_last, P = 16 pixels a block: six blocks, the last one pixel
    ((2, 20, 47, 13), 5, True),    # C = 20: vector lanes plus a tail of channels; 611 pixels in blocks of 409
    ((3, 40, 1, 1), 8, True),      # one pixel per sample
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_blocks_and_tails(isa, shape, num_groups, channels_last, dtype):
    x, w, b = _inputs(shape, dtype, "cpu", channels_last=channels_last, offset=3.0)
    for activation in ("silu", None):
        out = _native(x, num_groups, w, b, activation=activation)
        assert_rel_close(out, _naive(x, num_groups, w, b, 1e-5, activation), TOL_VS_FLOAT64[dtype],
                         f"native ({isa}) {shape} activation={activation}")


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["none", "weight", "bias", "both"])
@pytest.mark.parametrize("param_dtype", ["fp32", "x"], ids=["fp32_params", "x_dtype_params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_native_affine_and_activation(affine, activation, param_dtype, dtype):
    _native_ready()
    pd = torch.float32 if param_dtype == "fp32" else dtype
    x, w, b = _inputs((2, 12, 5, 6), dtype, "cpu", affine=affine, param_dtype=pd)
    out = _native(x, 3, w, b, activation=activation)
    assert_rel_close(out, _naive(x, 3, w, b, 1e-5, activation), TOL_VS_FLOAT64[dtype], "native affine variants")


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_native_large_mean_offset(isa, offset, channels_last):
    """x = offset + randn in fp32 with one constant group: fp32 blocks merged in fp64 and the mean carried as two
    floats lose nothing — within 2e-5 of float64 at offset 1000 (the reference needs 5e-4 there)."""
    x, w, b = _inputs((2, 16, 9, 9), torch.float32, "cpu", channels_last=channels_last, offset=offset)
    x[1, 4:8] = offset  # sample 1, group 1: constant, variance exactly 0
    for activation in ("silu", None):
        out = _native(x, 4, w, b, activation=activation)
        assert_rel_close(out, _naive(x, 4, w, b, 1e-5, activation), TOL_VS_FLOAT64[torch.float32],
                         f"native ({isa}) offset {offset}")
    assert torch.isfinite(out).all()


def test_native_extreme_activations_and_non_finite(isa):
    """SiLU over normalised values of ±100 (exp clamped, no overflow to NaN), and a NaN that stays in its group."""
    x = torch.zeros(1, 4, 2, 8)
    x[0, :2, 0] = 1.0  # group 0: half ones, half zeros -> normalised to ±1
    w = torch.tensor([100.0, -100.0, 1.0, 1.0])
    y = _native(x, 2, w, None)
    torch.testing.assert_close(y.double(), _naive(x, 2, w, None, 1e-5, "silu"), rtol=1e-5, atol=1e-6)
    x[0, 3, 1, 2] = float("nan")
    y = _native(x, 2, w, None)
    assert torch.isnan(y[0, 2:]).all() and torch.isfinite(y[0, :2]).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_batch_and_thread_invariant(isa, channels_last, dtype):
    """Sample i's output is the same bits alone, in a batch of 9, at 1 and at 2 threads (the blocks depend only on a
    sample's shape and are merged in a fixed order)."""
    x, w, b = _inputs((9, 64, 24, 24), dtype, "cpu", channels_last=channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = _native(x, 32, w, b)
        torch.set_num_threads(1)
        single = [_native(x[i:i + 1], 32, w, b) for i in (0, 4, 8)]
    finally:
        torch.set_num_threads(threads)
    for i, one in zip((0, 4, 8), single):
        assert torch.equal(batched[i:i + 1], one), f"sample {i} differs between batch 9 / 2 threads and alone"


def test_native_empty_and_other_layouts():
    _native_ready()
    empty = torch.randn(0, 8, 4, 4)
    assert _native(empty, 4).shape == empty.shape
    x, w, b = _inputs((2, 8, 5, 6), torch.float32, "cpu")
    sliced = x[:, :, 1:4]  # neither contiguous nor channels_last: the public op copies it to contiguous
    assert_rel_close(ops.group_norm_silu(sliced, 4, w, b, backend="native"), _naive(sliced, 4, w, b, 1e-5, "silu"),
                     2e-5, "sliced input")


@pytest.mark.parametrize("args,error,match", [
    ((torch.ones(2, 8, 3, dtype=torch.int32), 4, None, None, 1e-5, True), TypeError, "x must be float32"),
    ((torch.ones(8), 4, None, None, 1e-5, True), ValueError, "x must have shape"),
    ((torch.ones(2, 8, 3), 3, None, None, 1e-5, True), ValueError, "num_groups must be a positive divisor of C=8"),
    ((torch.ones(2, 8, 3), 4, torch.ones(4), None, 1e-5, True), ValueError, r"weight must have shape \(8,\)"),
    ((torch.ones(2, 8, 3), 4, None, torch.ones(8, dtype=torch.float64), 1e-5, True), TypeError, "bias must be"),
    ((torch.ones(2, 8, 3), 4, None, None, 0.0, True), ValueError, "eps must be"),
], ids=["int_x", "rank_1", "groups", "weight_shape", "bias_dtype", "eps"])
def test_native_op_checks_its_inputs(args, error, match):
    """The registered operator, called directly, rejects what the public op would (same exception types)."""
    _native_ready()
    with pytest.raises(error, match=match):
        torch.ops.fastdiff.group_norm_silu_native(*args)


def test_native_is_the_cpu_default(monkeypatch):
    """Without the interpreter, CPU tensors take the native kernel (fastdiff info says so); FASTDIFF_BACKEND=torch
    and backend="torch" take the reference; without the kernel the reference runs and backend="native" raises."""
    _native_ready()
    from fastdiff import dispatch, native

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)  # the suite's default is the reference (conftest)
    cpu = torch.device("cpu")
    assert dispatch.select("group_norm_silu", cpu) == "native"
    assert fastdiff.info()["ops"]["group_norm_silu"] == "native"
    x, w, b = _inputs((2, 8, 4, 4), torch.float32, "cpu")
    fastdiff.reset_counts()
    ops.group_norm_silu(x, 4, w, b)
    ops.group_norm_silu(x, 4, w, b, backend="torch")
    assert fastdiff.counts() == {("group_norm_silu", "native"): 1, ("group_norm_silu", "torch"): 1}
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert dispatch.select("group_norm_silu", cpu) == "torch"
    monkeypatch.delenv("FASTDIFF_BACKEND")
    monkeypatch.setitem(native._kernels, ("group_norm_silu_native", "cpu"), False)
    monkeypatch.setattr(dispatch, "_warned", {"native-group_norm_silu-cpu"})  # the one warning: not this test's
    assert dispatch.select("group_norm_silu", cpu) == "torch"
    with pytest.raises(RuntimeError, match="backend='native' requested for group_norm_silu"):
        ops.group_norm_silu(x, 4, w, b, backend="native")
