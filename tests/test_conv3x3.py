"""fastdiff.ops.conv3x3 and fastdiff.nn.Conv2d: the CPU Winograd convolution (csrc/conv3x3_winograd_cpu.cpp).

Checked against float64 F.conv2d (an independent reference) on fresh random inputs: both tiles (F(2×2, 3×3) and
F(4×4, 3×3)), fp32 and bf16, odd image sizes and channel counts (vector tails, partial tiles, padded GEMM rows),
every instruction-set level this CPU runs (FASTDIFF_CPU_ISA), planted values (zeros, large offsets, NaN), batch and
thread invariance, layouts, the filter cache, the dispatch rule and bad input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_rel_close, cap_cpu_isa

import fastdiff
from fastdiff import nn as fnn
from fastdiff import ops, reference

ISAS = ["as_set", "avx2", "generic"]  # "as_set": FASTDIFF_CPU_ISA as the environment has it (the ISA matrix sets it)


def _native_ready():
    from fastdiff import native

    if not native.has_kernel("conv3x3_winograd_native", "cpu"):
        pytest.skip(f"the native extension has no conv3x3 kernel here: {native.status()}")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    _native_ready()
    return cap_cpu_isa(monkeypatch, request.param)


def _inputs(n, c, k, h, w, dtype=torch.float32, seed=0, channels_last=True, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    return x, weight, bias


def _float64(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


def _winograd(x, weight, bias, tile):
    """The registered op at a given tile, on the transformed filters of fastdiff.ops.winograd_weight."""
    return torch.ops.fastdiff.conv3x3_winograd_native(x, ops.winograd_weight(weight, tile), bias, tile)


# Relative L2 error vs float64, per (dtype, tile): fp32 F(2,3) is as accurate as a direct convolution (~1e-7);
# F(4,3)'s transforms (coefficients up to 8) cost about a decimal digit (measured ~3e-6); bf16 F(2,3) rounds the
# transformed tiles and filters to bf16: about twice the error of oneDNN's bf16 direct convolution (measured ~4e-3
# against ~2e-3), so the bound is also checked relative to that.
TOL = {(torch.float32, 2): 2e-6, (torch.float32, 4): 2e-5, (torch.bfloat16, 2): 1.5e-2}
SHAPES = [
    (1, 1, 1, 1, 1),      # one pixel, one channel
    (2, 5, 7, 5, 6),      # odd everything: partial tiles, channel tails, padded GEMM rows
    (3, 17, 33, 9, 7),    # C and K just past a vector
    (2, 16, 16, 8, 8),    # exact tiles, one vector of channels
    (1, 32, 48, 12, 20),  # non-square, K not a power of two
    (4, 64, 64, 4, 4),    # one F(4,3) tile per image
    (2, 40, 24, 2, 3),    # images smaller than a tile
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_native_matches_float64(isa, shape, dtype, tile):
    if dtype == torch.bfloat16 and tile == 4:
        pytest.skip("bf16 runs F(2,3) only (F(4,3) costs bf16 too many digits)")
    n, c, k, h, w = shape
    x, weight, bias = _inputs(n, c, k, h, w, dtype, seed=sum(shape))
    y = _winograd(x, weight, bias, tile)
    assert y.shape == (n, k, h, w) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, _float64(x, weight, bias), TOL[dtype, tile], f"winograd F({tile},3) {isa} {shape}")
    if dtype == torch.bfloat16:  # within 3x the direct bf16 convolution's own error
        direct = F.conv2d(x, weight, bias, padding=1)
        ref = _float64(x, weight, bias)
        err = (y.double() - ref).norm() / ref.norm()
        assert err <= 3 * (direct.double() - ref).norm() / ref.norm() + 1e-6


@pytest.mark.parametrize("tile", [2, 4])
def test_native_without_bias_and_with_fp32_bias_on_bf16(isa, tile):
    x, weight, bias = _inputs(2, 24, 20, 7, 9, seed=3)
    assert_rel_close(_winograd(x, weight, None, tile), _float64(x, weight, None), TOL[torch.float32, tile])
    xb, wb = x.bfloat16(), weight.bfloat16()
    assert_rel_close(_winograd(xb, wb, bias, 2), _float64(xb, wb, bias), TOL[torch.bfloat16, 2], "fp32 bias")


@pytest.mark.parametrize("tile", [2, 4])
def test_planted_values(isa, tile):
    """Zeros give exactly the bias; a large offset keeps its relative accuracy; a NaN reaches at least every output
    the float64 convolution marks NaN, and no output outside its tile neighbourhood."""
    x, weight, bias = _inputs(2, 32, 32, 11, 13, seed=5)
    y = _winograd(torch.zeros_like(x), weight, bias, tile)
    assert torch.equal(y, bias.view(1, -1, 1, 1).expand_as(y))
    xo, _, _ = _inputs(2, 32, 32, 11, 13, seed=5, offset=100.0)
    assert_rel_close(_winograd(xo, weight, bias, tile), _float64(xo, weight, bias), TOL[torch.float32, tile],
                     "offset 100")
    xn = x.clone()
    xn[1, 7, 5, 6] = float("nan")
    y = _winograd(xn, weight, bias, tile)
    want = torch.isnan(_float64(xn, weight, bias))
    got = torch.isnan(y)
    assert got[want].all()
    assert not got[0].any()                       # the other sample is untouched
    rows, cols = torch.nonzero(got[1].any(0), as_tuple=True)
    assert rows.min() >= (5 - 1) // tile * tile - tile and rows.max() <= (5 + 1) // tile * tile + 2 * tile - 1
    assert cols.min() >= (6 - 1) // tile * tile - tile and cols.max() <= (6 + 1) // tile * tile + 2 * tile - 1


@pytest.mark.parametrize("dtype,tile", [(torch.float32, 4), (torch.float32, 2), (torch.bfloat16, 2)],
                         ids=["fp32-F4", "fp32-F2", "bf16-F2"])
def test_batch_and_thread_invariance(isa, dtype, tile):
    """Each sample's output is the same bits alone, in batches that move it across block boundaries and slots, with
    unaligned channel counts, and at 1 and 2 threads."""
    x, weight, bias = _inputs(37, 20, 36, 9, 10, dtype, seed=7)
    u = ops.winograd_weight(weight, tile)
    full = torch.ops.fastdiff.conv3x3_winograd_native(x, u, bias, tile)
    for lo, hi in ((0, 1), (5, 6), (3, 20), (36, 37), (1, 37)):
        part = torch.ops.fastdiff.conv3x3_winograd_native(x[lo:hi], u, bias, tile)
        assert torch.equal(part, full[lo:hi]), (lo, hi)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.fastdiff.conv3x3_winograd_native(x, u, bias, tile)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, full)


def test_layouts_and_public_op(isa):
    """Contiguous input gives contiguous output, channels_last gives channels_last, a sliced view is read right; the
    public op counts the native path."""
    x, weight, bias = _inputs(3, 32, 16, 10, 10, seed=9, channels_last=False)
    want = _float64(x, weight, bias)
    for name, xin in (("nchw", x), ("channels_last", x.contiguous(memory_format=torch.channels_last)),
                      ("sliced", torch.cat([x, x], 1)[:, ::2])):
        if name == "sliced":
            want_here = _float64(xin, weight, bias)
        else:
            want_here = want
        fastdiff.reset_counts()
        with torch.no_grad():
            y = ops.conv3x3(xin, weight, bias, backend="native")
        assert fastdiff.counts() == {("conv3x3", "native"): 1}, name
        assert_rel_close(y, want_here, TOL[torch.float32, 4], name)
        if name == "nchw":
            assert y.is_contiguous()
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_tile_choice_never_depends_on_the_batch():
    for n in (1, 2, 7, 64):
        assert ops.winograd_tile((n, 32, 16, 16), torch.float32, (32, 32, 3, 3)) == 4
        assert ops.winograd_tile((n, 64, 4, 4), torch.float32, (64, 64, 3, 3)) == 2
        assert ops.winograd_tile((n, 128, 16, 16), torch.bfloat16, (128, 128, 3, 3)) == 2
        assert ops.winograd_tile((n, 128, 8, 8), torch.bfloat16, (64, 128, 3, 3)) == 2
        assert ops.winograd_tile((n, 64, 16, 16), torch.bfloat16, (64, 64, 3, 3)) == 0
        assert ops.winograd_tile((n, 8, 16, 16), torch.float32, (32, 8, 3, 3)) == 0
        assert ops.winograd_tile((n, 64, 16, 16), torch.float16, (64, 64, 3, 3)) == 0


def test_filter_transform_is_cached_and_follows_the_weight(monkeypatch):
    _native_ready()
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    conv = fnn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 8, 8)
    fastdiff.reset_counts()
    with torch.no_grad():
        first = conv(x)
    assert fastdiff.counts() == {("conv3x3", "native"): 1}
    with torch.no_grad():
        u = ops._cached_winograd_weight(conv.weight, 4)
        assert ops._cached_winograd_weight(conv.weight, 4) is u  # computed once
        conv.weight.mul_(2.0)                                     # in place: the version counter moves
        assert ops._cached_winograd_weight(conv.weight, 4) is not u
        second = conv(x)
    assert_rel_close(second - conv.bias.view(1, -1, 1, 1), 2 * (first - conv.bias.view(1, -1, 1, 1)), 1e-5)
    conv.load_state_dict({"weight": torch.zeros_like(conv.weight), "bias": conv.bias.detach().clone()})
    with torch.no_grad():
        assert torch.equal(conv(x), conv.bias.view(1, -1, 1, 1).expand(2, -1, 8, 8))
    with torch.no_grad():
        conv.weight.data.mul_(0.5)  # through .data (the EMA idiom): no version bump, still seen
        conv.weight.data.add_(1.0)
        assert_rel_close(conv(x), _float64(x, conv.weight, conv.bias), TOL[torch.float32, 4], "after .data update")
    ident = id(conv.weight)
    del conv
    assert (ident, 4) not in ops._winograd_weights  # dropped with the weight


def test_filter_cache_follows_a_dtype_change(monkeypatch):
    _native_ready()
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    conv = fnn.Conv2d(128, 64, 3, padding=1)
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.to(torch.bfloat16)
        fastdiff.reset_counts()
        y = conv(x.bfloat16())
    assert fastdiff.counts() == {("conv3x3", "native"): 1} and y.dtype == torch.bfloat16
    assert ops._winograd_weights[(id(conv.weight), 2)][2].dtype == torch.bfloat16
    assert_rel_close(y, _float64(x.bfloat16(), conv.weight, conv.bias), TOL[torch.bfloat16, 2], "after .to(bf16)")


def test_conv2d_under_autocast_is_torchs(monkeypatch):
    """Under torch.autocast the module runs torch's own forward (autocast picks the dtypes), as nn.Conv2d does."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    ours = fnn.Conv2d(32, 32, 3, padding=1)
    theirs = torch.nn.Conv2d(32, 32, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, want = ours(x), theirs(x)
        got_bf16 = ours(x.bfloat16())  # a bf16 activation with fp32 weights, as autocast models have
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(got_bf16, want)


def test_bf16_input_with_fp32_bias_on_every_path(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    x, weight, bias = _inputs(2, 32, 16, 8, 8, seed=15)
    xb, wb = x.bfloat16(), weight.bfloat16()
    want = _float64(xb, wb, bias)
    for backend in (None, "torch"):  # bf16 at 32 channels: oneDNN's direct convolution either way
        with torch.no_grad():
            y = ops.conv3x3(xb, wb, bias, backend=backend)
        assert y.dtype == torch.bfloat16
        assert_rel_close(y, want, TOL[torch.bfloat16, 2], f"backend={backend}")


def test_single_block_and_many_blocks_agree(isa):
    """A batch whose tiles fit one block and a batch that needs two run their GEMMs alike (one thread each, inside
    the parallel region): the same bits for the same sample, at GEMM sizes where BLAS would thread on its own."""
    x, weight, bias = _inputs(9, 320, 320, 8, 8, seed=16)
    u = ops.winograd_weight(weight, 4)
    full = torch.ops.fastdiff.conv3x3_winograd_native(x, u, bias, 4)  # 36 tiles: two blocks
    one = torch.ops.fastdiff.conv3x3_winograd_native(x[:1], u, bias, 4)  # 4 tiles: one block
    assert torch.equal(one, full[:1])


def test_conv2d_module_matches_torch_and_keeps_the_state_dict(monkeypatch):
    """fastdiff.nn.Conv2d is torch.nn.Conv2d for every configuration; the 3×3 / stride 1 / padding 1 case runs the
    Winograd op, the rest torch's forward."""
    _native_ready()
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    torch.manual_seed(0)
    for kwargs in ({"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "padding": 1, "bias": False},
                   {"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": 1},
                   {"kernel_size": 3, "padding": 1, "groups": 2}):
        ours = fnn.Conv2d(32, 32, **kwargs)
        theirs = torch.nn.Conv2d(32, 32, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())
        x = torch.randn(2, 32, 9, 9)
        fastdiff.reset_counts()
        with torch.no_grad():
            got = ours(x)
        runs_op = kwargs.get("kernel_size") == 3 and "stride" not in kwargs and "groups" not in kwargs
        assert (("conv3x3", "native") in fastdiff.counts()) == runs_op, kwargs
        assert_rel_close(got, _float64(x, theirs.weight, theirs.bias) if runs_op else theirs(x).double(), 2e-5,
                         str(kwargs))


def test_dispatch_rule(monkeypatch):
    """auto on the CPU: native where eligible; FASTDIFF_BACKEND=torch, backend='torch', autograd and ineligible
    inputs: the reference, which is F.conv2d itself."""
    _native_ready()
    x, weight, bias = _inputs(2, 32, 32, 8, 8, seed=11)
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    for backend, want in ((None, "native"), ("native", "native"), ("torch", "torch"), ("triton", "torch")):
        fastdiff.reset_counts()
        with torch.no_grad():
            ops.conv3x3(x, weight, bias, backend=backend)
        assert fastdiff.counts() == {("conv3x3", want): 1}, backend
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    fastdiff.reset_counts()
    y = ops.conv3x3(x, weight, bias)
    assert fastdiff.counts() == {("conv3x3", "torch"): 1}
    assert torch.equal(y, reference.conv3x3(x, weight, bias))
    monkeypatch.delenv("FASTDIFF_BACKEND")
    w = weight.clone().requires_grad_()
    y = ops.conv3x3(x, w, bias)  # autograd: the reference, differentiable
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert fastdiff.info()["ops"]["conv3x3"] == "native"


def test_bad_input_is_rejected_before_any_work():
    x, weight, bias = _inputs(2, 8, 4, 5, 5)
    cases = [
        (lambda: ops.conv3x3(x[0], weight), ValueError, "x must have shape"),
        (lambda: ops.conv3x3(x, weight[:, :4]), ValueError, "weight must have shape"),
        (lambda: ops.conv3x3(x, weight[..., :2]), ValueError, "weight must have shape"),
        (lambda: ops.conv3x3(x, weight.double()), TypeError, "weight must have dtype"),
        (lambda: ops.conv3x3(x, weight, bias[:3]), ValueError, "bias must have shape"),
        (lambda: ops.conv3x3(x, weight, bias.double()), TypeError, "bias must have dtype"),
        (lambda: ops.conv3x3(x.long(), weight), TypeError, "x must have dtype"),
        (lambda: ops.conv3x3(x, weight, backend="fast"), ValueError, "backend must be one of"),
        (lambda: ops.conv3x3(x, [1.0]), TypeError, "weight must be a torch.Tensor"),
        (lambda: ops.winograd_weight(weight, 3), ValueError, "tile must be one of"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_registered_op_checks_its_inputs():
    _native_ready()
    x, weight, bias = _inputs(2, 8, 4, 5, 5)
    u4 = ops.winograd_weight(weight, 4)
    op = torch.ops.fastdiff.conv3x3_winograd_native
    cases = [
        ((x, u4, bias, 3), ValueError, "tile must be 2 or 4"),
        ((x, u4, bias, 2), ValueError, "u must have shape"),
        ((x[0], u4, bias, 4), ValueError, "x must have shape"),
        ((x.half(), u4.half(), bias, 4), TypeError, "x must be float32 or bfloat16"),
        ((x, u4.bfloat16(), bias, 4), TypeError, "u must have x's dtype"),
        ((x, u4.transpose(1, 2), bias, 4), ValueError, "u must"),
        ((x, u4, bias[:2], 4), ValueError, "bias must have shape"),
        ((x, u4, bias.double(), 4), TypeError, "bias must be float32"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            op(*args)
    empty = op(x[:0], u4, bias, 4)
    assert empty.shape == (0, 4, 5, 5)
