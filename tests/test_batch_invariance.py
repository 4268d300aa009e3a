"""fastdiff.batch_invariant: every row of a batched forward pass has the same bits whatever the batch size, and the
mode computes the same function as plain PyTorch (up to float32 rounding).

The models are small random ones; the batch sizes include 1 and 2 (where oneDNN/BLAS switch kernels on CPU) and
sizes that are not multiples of the convolution chunk. Also: the calls the mode routes (keyword forms, shape checks
that leave torch's own errors, autocast), the dispatch record that shows the native GEMM ran, FASTDIFF_CPU_ISA's
check, and what cpu_code_path() records.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import batch_invariance, dispatch, native
from fastdiff.models import AutoencoderKL, DCGANGenerator, StyleGenerator, UNet

NATIVE = ("rows_matmul", "native")  # dispatch.counts() keys: the mode's products on the native GEMM...
FALLBACK = ("rows_matmul", "torch")  # ...and on BLAS in fixed-shape chunks
X86 = platform.machine().lower() in ("x86_64", "amd64")

TOTAL = 21
SIZES = (1, 2, 3, 5, 16, 17)  # sub-batches compared against the full batch of TOTAL rows


def _unet_cond():
    model = UNet(in_channels=4, out_channels=4, base_channels=16, channel_mult=(1, 2), layers_per_block=1,
                 attention_levels=(0, 1), norm_num_groups=4, num_attention_heads=2, num_classes=10, context_dim=12)
    inputs = (torch.randn(TOTAL, 4, 8, 8), torch.randint(0, 1000, (TOTAL,)))
    kwargs = {"class_labels": torch.randint(0, 10, (TOTAL,)), "context": torch.randn(TOTAL, 7, 12)}
    return model, (lambda s: model(inputs[0][s], inputs[1][s], **{k: v[s] for k, v in kwargs.items()}))


def _decoder():
    model = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    z = torch.randn(TOTAL, 4, 8, 8)
    return model, (lambda s: model.decode(z[s]))


def _dcgan():
    model = DCGANGenerator(resolution=16, latent_dim=32, channels=1, width=16)
    z = torch.randn(TOTAL, 32)
    return model, (lambda s: model(z[s]))


def _style():
    model = StyleGenerator(resolution=8, latent_dim=8, w_dim=8, mapping_layers=2, base_channels=8, max_channels=8,
                           channels=1)
    z = torch.randn(TOTAL, 8)
    noise = model.make_noise(TOTAL)
    return model, (lambda s: model(z[s], noise=[n[s] for n in noise]))


def _sample(out):
    return getattr(out, "sample", out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("factory", [_unet_cond, _decoder, _dcgan, _style],
                         ids=["unet_cond", "vae_decoder", "dcgan", "style"])
def test_rows_do_not_depend_on_the_batch(factory, threads):
    torch.manual_seed(0)
    model, call = factory()
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    dispatch.reset_counts()
    try:
        with torch.no_grad():
            plain = _sample(call(slice(0, TOTAL)))
            with fastdiff.batch_invariant():
                full = _sample(call(slice(0, TOTAL)))
                for n in SIZES:
                    for start in (0, TOTAL - n):
                        part = _sample(call(slice(start, start + n)))
                        assert torch.equal(part, full[start:start + n]), (
                            f"rows {start}..{start + n - 1}: max diff {(part - full[start:start + n]).abs().max()}")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)  # the same function
    if factory is not _dcgan and native.has_rows_matmul():  # (the DCGAN generator has no linear layer or product)
        assert dispatch.counts().get(NATIVE, 0) > 0 and FALLBACK not in dispatch.counts(), dispatch.counts()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_of_one_gets_the_gemm_of_any_other_batch(threads):
    """The planted case of the first failure: (7 tokens × 12) @ (12 × 32) per row. Outside the mode a batch of 1 is one
    BLAS GEMM (threaded when torch has 2 threads) and a larger batch a batched GEMM (one single-threaded GEMM per
    row); MKL's threaded small GEMM sums in another order on some CPUs. Inside the mode fastdiff's own GEMM computes
    each element as one FMA chain, whatever the rows around it."""
    if not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    torch.manual_seed(3)
    x, w, b = torch.randn(TOTAL, 7, 12), torch.randn(32, 12), torch.randn(32)
    y, z = torch.randn(TOTAL, 7, 32), torch.randn(TOTAL, 32, 5)
    ops = {
        "linear": lambda s: F.linear(x[s], w, b),
        "matmul": lambda s: x[s] @ w.t(),
        "mm": lambda s: torch.mm(x[s][:, 0], w.t()),
        "bmm": lambda s: torch.bmm(y[s], z[s]),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastdiff.batch_invariant():
            for name, op in ops.items():
                dispatch.reset_counts()
                full = op(slice(0, TOTAL))
                for n in (1, 2, 3, batch_invariance.CHUNK + 1):
                    for start in (0, TOTAL - n):
                        assert torch.equal(op(slice(start, start + n)), full[start:start + n]), (name, start, n)
                assert dispatch.counts() == {NATIVE: 9}, (name, dispatch.counts())  # every call: the native GEMM
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_matmuls_match_plain_torch(path, monkeypatch):
    if path == "fallback":  # BLAS in fixed-shape chunks: without the extension, other dtypes, or autograd
        monkeypatch.setattr(native, "has_rows_matmul", lambda: False)
    elif not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    torch.manual_seed(4)
    a, w, v = torch.randn(5, 3, 9), torch.randn(9, 4), torch.randn(9)
    p, q = torch.randn(19, 6, 7), torch.randn(19, 7, 2)
    dispatch.reset_counts()
    with fastdiff.batch_invariant():
        got = [a @ w, torch.matmul(a, w), a.matmul(w), torch.mm(a[0], w), a[0].mm(w), torch.bmm(p, q), p.bmm(q),
               torch.matmul(w.t(), a[0].t()), a @ v]
        empty = torch.mm(a[0][:0], w)
    want = [a @ w, a @ w, a @ w, a[0] @ w, a[0] @ w, p @ q, p @ q, w.t() @ a[0].t(), a @ v]
    for g, e in zip(got, want):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, 4)
    # the first 8 went through the mode's GEMM; a @ v (1-D right operand) and the empty product went to torch
    assert dispatch.counts() == {NATIVE if path == "native" else FALLBACK: 8}, dispatch.counts()


def test_linear_and_convolutions_match_plain_torch():
    torch.manual_seed(1)
    w, b = torch.randn(24, 40), torch.randn(24)
    with fastdiff.batch_invariant():
        for x in (torch.randn(5, 40), torch.randn(5, 9, 40), torch.randn(3, 2, 4, 40)):
            torch.testing.assert_close(F.linear(x, w, b), x @ w.t() + b, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(F.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
        v = torch.randn(40)  # 1-D: no batch, plain F.linear
        torch.testing.assert_close(F.linear(v, w, b), w @ v + b, rtol=1e-5, atol=1e-4)
        x = torch.randn(batch_invariance.CHUNK * 2 + 3, 6, 9, 9)
        cw, tw = torch.randn(8, 6, 3, 3), torch.randn(6, 8, 4, 4)
        got = F.conv2d(x, cw, stride=2, padding=1)
        got_t = F.conv_transpose2d(x, tw, stride=2, padding=1)
        empty = F.conv2d(x[:0], cw, padding=1)
    torch.testing.assert_close(got, F.conv2d(x, cw, stride=2, padding=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_t, F.conv_transpose2d(x, tw, stride=2, padding=1), rtol=1e-5, atol=1e-4)
    assert got.shape == (x.shape[0], 8, 5, 5) and got_t.shape == (x.shape[0], 8, 18, 18)
    assert empty.shape == (0, 8, 9, 9)


def test_gradients_flow_and_the_mode_is_scoped():
    torch.manual_seed(2)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6, requires_grad=True)
    with fastdiff.batch_invariant():
        lin(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    lin.zero_grad()
    lin(x).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)

    dispatch.reset_counts()
    with fastdiff.batch_invariant(enabled=False):
        lin(x)
    assert not dispatch.counts()  # enabled=False is a no-op
    with fastdiff.batch_invariant():
        lin(x)
    assert dispatch.counts() == {FALLBACK: 1}  # x needs gradients: BLAS in fixed-shape chunks
    lin(x)  # outside the block: plain torch again
    assert dispatch.counts() == {FALLBACK: 1}


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_keyword_calls_take_the_mode_path(path, monkeypatch):
    """F.linear(input=..., weight=...), torch.mm(input=..., mat2=...), F.conv2d(input=...)...: torch's keyword names
    work in the mode as outside it, and still go through the mode's GEMM / chunked convolution; ``out=`` goes to
    torch."""
    if path == "fallback":
        monkeypatch.setattr(native, "has_rows_matmul", lambda: False)
    elif not native.has_rows_matmul():
        pytest.skip(f"native extension: {native.status()}")
    torch.manual_seed(5)
    x, w, b = torch.randn(5, 3, 9), torch.randn(4, 9), torch.randn(4)
    p, q = torch.randn(3, 6, 9), torch.randn(3, 9, 2)
    img, cw, tw = torch.randn(batch_invariance.CHUNK + 2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(3, 4, 2, 2)
    calls = {
        "linear(input=, weight=)": (lambda: F.linear(input=x, weight=w), x @ w.t()),
        "linear(input=, weight=, bias=)": (lambda: F.linear(input=x, weight=w, bias=b), x @ w.t() + b),
        "linear(x, weight=, bias=)": (lambda: F.linear(x, weight=w, bias=b), x @ w.t() + b),
        "linear(x, w, bias=)": (lambda: F.linear(x, w, bias=b), x @ w.t() + b),
        "matmul(input=, other=)": (lambda: torch.matmul(input=x, other=w.t()), x @ w.t()),
        "Tensor.matmul(other=)": (lambda: x.matmul(other=w.t()), x @ w.t()),
        "mm(input=, mat2=)": (lambda: torch.mm(input=x[0], mat2=w.t()), x[0] @ w.t()),
        "Tensor.mm(mat2=)": (lambda: x[0].mm(mat2=w.t()), x[0] @ w.t()),
        "bmm(input=, mat2=)": (lambda: torch.bmm(input=p, mat2=q), p @ q),
        "Tensor.bmm(mat2=)": (lambda: p.bmm(mat2=q), p @ q),
    }
    convs = {
        "conv2d(input=, weight=)": (lambda: F.conv2d(input=img, weight=cw, padding=1),
                                    F.conv2d(img, cw, padding=1)),
        "conv2d(x, weight=)": (lambda: F.conv2d(img, weight=cw, stride=2), F.conv2d(img, cw, stride=2)),
        "conv_transpose2d(input=, weight=)": (lambda: F.conv_transpose2d(input=img, weight=tw, stride=2),
                                              F.conv_transpose2d(img, tw, stride=2)),
    }
    seen = []
    real_chunked = batch_invariance._chunked
    monkeypatch.setattr(batch_invariance, "_chunked", lambda *a, **k: seen.append(1) or real_chunked(*a, **k))
    for name, (call, want) in {**calls, **convs}.items():
        dispatch.reset_counts()
        seen.clear()
        with fastdiff.batch_invariant():
            got = call()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        if name in calls:
            assert dispatch.counts() == {NATIVE if path == "native" else FALLBACK: 1}, (name, dispatch.counts())
        else:
            assert seen and not dispatch.counts(), name  # chunked
    out = torch.empty(3, 4)
    dispatch.reset_counts()
    with fastdiff.batch_invariant():
        result = torch.mm(x[0], w.t(), out=out)
    assert result is out and not dispatch.counts()
    torch.testing.assert_close(out, x[0] @ w.t())


def _same_outcome(call):
    """call() inside the mode gives what it gives outside: the same error (type and message) or an equal tensor."""
    try:
        want = call()
    except Exception as exc:  # torch's own error
        with fastdiff.batch_invariant():
            with pytest.raises(type(exc)) as got:
                call()
        assert str(got.value) == str(exc)
        return None
    with fastdiff.batch_invariant():
        got = call()
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_calls_the_mode_does_not_handle_are_torch_own(path, monkeypatch):
    """Shapes are checked before routing: a call outside the mode's paths (bad or mismatched shapes, K = 0, empty,
    mixed dtypes) runs as torch runs it, so torch's own RuntimeError or result comes out."""
    if path == "fallback":
        monkeypatch.setattr(native, "has_rows_matmul", lambda: False)
    a3, a2, w = torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(4, 5)
    p, q = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    bias, w1, img, cw = torch.randn(4), torch.randn(4), torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3)
    errors = {
        "mm of a 3-D tensor": lambda: torch.mm(a3, w),
        "Tensor.mm of a 3-D tensor": lambda: a3.mm(w),
        "mm with a 3-D mat2": lambda: torch.mm(a2, q),
        "mm inner sizes differ": lambda: torch.mm(a2, torch.randn(5, 5)),
        "matmul inner sizes differ": lambda: a3 @ torch.randn(3, 5),
        "bmm batch sizes differ": lambda: torch.bmm(p, torch.randn(3, 4, 5)),
        "bmm inner sizes differ": lambda: torch.bmm(p, torch.randn(2, 3, 5)),
        "bmm of a 2-D tensor": lambda: torch.bmm(a2, q),
        "linear sizes differ": lambda: F.linear(a3, torch.randn(5, 3)),
        "linear bias size": lambda: F.linear(a3, torch.randn(5, 4), torch.randn(3)),
        "mm dtypes differ": lambda: torch.mm(a2, w.double()),
        "linear dtypes differ": lambda: F.linear(a3, torch.randn(5, 4).double()),
    }
    for name, call in errors.items():
        with pytest.raises(RuntimeError):
            call()
        _same_outcome(call)
    results = {
        "mm K=0": lambda: torch.mm(torch.randn(3, 0), torch.randn(0, 4)),
        "matmul K=0": lambda: torch.randn(2, 3, 0) @ torch.randn(0, 4),
        "bmm K=0": lambda: torch.bmm(torch.randn(2, 3, 0), torch.randn(2, 0, 4)),
        "linear K=0": lambda: F.linear(torch.randn(2, 3, 0), torch.randn(4, 0), bias),
        "bmm empty batch": lambda: torch.bmm(torch.randn(0, 3, 4), torch.randn(0, 4, 5)),
        "matmul N=0": lambda: a3 @ torch.randn(4, 0),
        "linear 1-D weight": lambda: F.linear(a3, w1),
        "conv2d unbatched": lambda: F.conv2d(img, cw),
    }
    dispatch.reset_counts()
    for name, call in results.items():
        assert _same_outcome(call) is not None, name
    assert not dispatch.counts()  # none of them was routed
    with fastdiff.batch_invariant():
        with pytest.raises(TypeError):
            F.conv2d()  # no input at all: torch's TypeError, not the mode's IndexError


def test_autocast_is_left_to_torch():
    """Under autocast the matrix products are torch's (autocast's dtype, autocast's bits), not the fp32 native GEMM."""
    torch.manual_seed(6)
    x, w, b = torch.randn(6, 5, 8), torch.randn(3, 8), torch.randn(3)
    p, q = torch.randn(4, 5, 8), torch.randn(4, 8, 2)
    calls = [lambda: F.linear(x, w, b), lambda: x @ w.t(), lambda: torch.mm(x[0], w.t()), lambda: torch.bmm(p, q)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [call() for call in calls]
        dispatch.reset_counts()
        with fastdiff.batch_invariant():
            got = [call() for call in calls]
            with torch.autocast("cpu", enabled=False):
                fp32 = F.linear(x, w, b)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == torch.bfloat16
        assert torch.equal(g, e)
    assert fp32.dtype == torch.float32
    assert dispatch.counts() == {NATIVE if native.has_rows_matmul() else FALLBACK: 1}  # only the autocast-off call


def test_fastdiff_cpu_isa_is_checked(monkeypatch):
    """FASTDIFF_CPU_ISA in any case (written back in lower case for the C++ side); any other value is a ValueError
    naming the variable and the allowed values: from native.cpu_isa(), the mode, cpu_code_path() and, before the
    extension loads, native.load()."""
    monkeypatch.delenv("FASTDIFF_CPU_ISA", raising=False)
    assert native.cpu_isa() == "auto"
    for raw, want in ((" AVX2 ", "avx2"), ("Generic", "generic"), ("avx512", "avx512"), ("AUTO", "auto"), ("", "auto")):
        monkeypatch.setenv("FASTDIFF_CPU_ISA", raw)
        assert native.cpu_isa() == want
        assert os.environ["FASTDIFF_CPU_ISA"] == want
    monkeypatch.setenv("FASTDIFF_CPU_ISA", "GENERIC")
    if native.has_rows_matmul():
        path = batch_invariance.cpu_code_path()
        assert path["native"] == "generic" and path["rows_matmul"] == "generic"  # the C++ side saw the cap
    monkeypatch.setenv("FASTDIFF_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match=r"FASTDIFF_CPU_ISA must be one of auto, avx512, avx2, generic .*'avx-512'"):
        native.cpu_isa()
    with pytest.raises(ValueError, match="FASTDIFF_CPU_ISA"):
        batch_invariance.cpu_code_path()
    if native.has_rows_matmul():
        with fastdiff.batch_invariant(), pytest.raises(ValueError, match="FASTDIFF_CPU_ISA"):
            F.linear(torch.randn(2, 3), torch.randn(4, 3))
    proc = subprocess.run([sys.executable, "-c", "from fastdiff import native; native.load()"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FASTDIFF_CPU_ISA": "sse"}, check=False)
    assert proc.returncode != 0 and "ValueError: FASTDIFF_CPU_ISA must be one of" in proc.stderr, proc.stderr[-2000:]


def test_cpu_code_path_records_what_it_knows(monkeypatch):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FASTDIFF_CPU_ISA", "MKL_CBWR",
                "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE"):
        monkeypatch.delenv(var, raising=False)
    path = batch_invariance.cpu_code_path()
    assert set(path) == {"aten", "onednn", "native", "rows_matmul", "mkl", "torch", "machine"}
    assert path["aten"] == torch.backends.cpu.get_cpu_capability()
    if native.has_rows_matmul():
        assert path["rows_matmul"] == {"amx": "avx512"}.get(path["native"], path["native"])
        assert path["rows_matmul"] in ("avx512", "avx2", "generic")
    else:
        assert path["rows_matmul"] == "unavailable"
    if torch.backends.mkl.is_available():
        assert path["mkl"] in torch.__config__.show()  # the version line torch reports
    else:
        assert path["mkl"] == "unavailable"
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert batch_invariance.cpu_code_path()["mkl"] == f"{path['mkl']}, MKL_CBWR=AVX2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX-9000")  # ATen ignores what it does not know: recorded verbatim
    assert batch_invariance.cpu_code_path()["aten"] == f"{path['aten']}, ATEN_CPU_CAPABILITY=AVX-9000"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", path["aten"].lower())
    assert batch_invariance.cpu_code_path()["aten"] == path["aten"]
    if not X86:
        return
    for cap in ("AVX10_2_512", "avx512-core"):  # a preview ISA, a typo: not modelled, recorded verbatim
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert f"ONEDNN_MAX_CPU_ISA={cap} (not modelled)" in batch_invariance.cpu_code_path()["onednn"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "sse41")
    assert batch_invariance.cpu_code_path()["onednn"] == "SSE41"
    if torch.cpu._is_avx2_supported():
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")
        assert batch_invariance.cpu_code_path()["onednn"] == "AVX"


def _fake_cpu(monkeypatch, flags, **torch_flags):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(batch_invariance, "_cpuinfo_flags", lambda: None if flags is None else frozenset(flags))
    for name in ("avx2", "avx512", "vnni", "avx512_bf16", "amx_tile", "amx_fp16"):
        monkeypatch.setattr(torch.cpu, f"_is_{name}_supported", lambda on=torch_flags.get(name, False): on)


def test_onednn_isa_model(monkeypatch):
    """oneDNN's documented partial order of ONEDNN_MAX_CPU_ISA values, on made-up CPUs."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    admits = batch_invariance._onednn_admits
    assert "AVX2_VNNI" in admits("AVX512_CORE_FP16") and "AVX2_VNNI" not in admits("AVX512_CORE_BF16")
    assert "AVX512_CORE" not in admits("AVX2_VNNI_2") and "AVX2_VNNI_2" not in admits("AVX512_CORE_AMX_FP16")
    assert admits("AVX512_CORE_AMX") == set(batch_invariance.ONEDNN_ISAS) - {"AVX2_VNNI_2", "AVX512_CORE_AMX_FP16"}
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    isa = batch_invariance._onednn_isa

    _fake_cpu(monkeypatch, {"sse4_1", "avx", "avx2", "avx_vnni"}, avx2=True)  # AVX2 with AVX-VNNI, no AVX-512
    assert isa() == "AVX2_VNNI"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # AVX2_VNNI is not below AVX512_CORE
    assert isa() == "AVX2"
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "SSE41")  # the older name counts only without ONEDNN_MAX_CPU_ISA
    assert isa() == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert isa() == "SSE41"
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")

    amx = {"sse4_1", "avx", "avx2", "avx_vnni", "avx512_fp16", "amx_tile"}
    _fake_cpu(monkeypatch, amx, avx2=True, avx512=True, vnni=True, avx512_bf16=True, amx_tile=True)
    assert isa() == "AVX512_CORE_AMX"
    for cap, want in (("avx10_1_512", "AVX512_CORE_FP16"), ("AVX512_CORE_BF16", "AVX512_CORE_BF16"),
                      ("AVX2_VNNI_2", "AVX2_VNNI"), ("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX"),
                      ("All", "AVX512_CORE_AMX")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert isa() == want, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    _fake_cpu(monkeypatch, None, avx2=True, avx512=True, vnni=True, avx512_bf16=True)  # no /proc/cpuinfo
    assert isa() == "AVX512_CORE_BF16 (not known here: AVX2_VNNI, AVX2_VNNI_2, AVX512_CORE_FP16)"
