"""fastdiff.ops.attention: the Triton kernel (interpreter on CPU, compiled on CUDA) against the reference, the
reference against a naive float64 softmax(q kᵀ · scale) v, and bad input.

The kernel is compared with the reference evaluated in float64 on the same (rounded) inputs, so the error measured
is the kernel's own: fp32 must stay at fp32 accuracy (TF32 would fail), fp16/bf16 see the rounding of the
probabilities and of the output. Under the interpreter the kernel runs with BLOCK_N = 64 query rows and BLOCK_M = 32
keys, so the shapes below cover one and several query blocks, one and several key tiles, and a masked last tile.
"""

from __future__ import annotations

import os

import pytest
import torch
from utils import assert_rel_close, poison_empty, rel_err

import fastdiff
from fastdiff import dispatch, ops, reference

# relative-error tolerances, kernel vs float64. Seen (interpreter, these shapes): fp32 ≤ 5e-7, fp16 ≤ 3e-4,
# bf16 ≤ 6e-3 (the interpreter rounds fp32 → bf16 toward zero; the GPU rounds to nearest, about half that)
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# reference (torch SDPA in the input dtype) vs float64
REFERENCE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [  # (B, H, N, M, D)
    (1, 1, 1, 1, 32),  # N=1, M=1
    (1, 2, 1, 77, 64),  # N=1 query row, M=77 text tokens
    (2, 1, 130, 130, 40),  # self-attention, N=M not a multiple of either block, D=40 padded to 64
    (1, 2, 100, 77, 64),  # cross-attention, M=77: full key tiles then a masked tail
    (2, 2, 65, 1, 80),  # M=1, B*H=4, D=80 padded to 128
    (1, 1, 64, 64, 128),  # exact multiples of the blocks: no masking anywhere
    (1, 1, 33, 50, 160),  # D=160 padded to 256
    (1, 1, 20, 300, 96),  # long M: ten key tiles, the running max and rescale at work
]
HEAD_DIMS = [8, 32, 40, 64, 80, 96, 128, 160]  # 8: below the 16-wide dot minimum, padded


@pytest.fixture
def device(device):
    """conftest's device, but CPU kernel runs need the interpreter, also on a machine with CUDA."""
    if device.type == "cpu" and not dispatch.interpret_enabled():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    return device


def _ids(shape):
    return "B{}H{}N{}M{}D{}".format(*shape)


def _inputs(shape, dtype, device, scale_q: float = 1.0):
    b, h, n, m, d = shape
    q = (torch.randn(b, h, n, d) * scale_q).to(dtype).to(device)
    k = torch.randn(b, h, m, d).to(dtype).to(device)
    v = torch.randn(b, h, m, d).to(dtype).to(device)
    return q, k, v


def _oracle(q, k, v, scale):
    """The reference path evaluated in float64 on the same (already rounded) inputs, on the CPU."""
    return reference.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), scale)


def _naive(q, k, v, scale):
    """softmax(q kᵀ · scale) v written out in float64, independent of SDPA."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, N, M)
    return torch.softmax(scores, dim=-1) @ v  # (B, H, N, D)


def _expected_path(device):
    return "triton" if device.type == "cuda" else "interpreter"


def _run_kernel(monkeypatch, q, k, v, scale=None):
    """Poison fresh allocations, run the Triton path, and check that it (and only it) ran.

    On CUDA this runs one heuristic config instead of autotuning (which would compile ~13 configs per shape);
    test_kernel_every_tuned_config and test_kernel_autotuned cover the tuned configs and the autotuner.
    """
    if q.device.type == "cuda":
        monkeypatch.setattr(dispatch.load_kernels("attention"), "_AUTOTUNE", False)
    poison_empty(monkeypatch)
    fastdiff.reset_counts()
    out = ops.attention(q, k, v, scale=scale, backend="triton")
    assert fastdiff.counts() == {("attention", _expected_path(q.device)): 1}
    monkeypatch.undo()
    return out


# --------------------------------------------------------------------------------------------- (a) kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_kernel_matches_reference(device, monkeypatch, shape, dtype):
    q, k, v = _inputs(shape, dtype, device)
    scale = shape[-1] ** -0.5
    expected = _oracle(q, k, v, scale)
    out = _run_kernel(monkeypatch, q, k, v)
    assert out.dtype == dtype and out.device == q.device and out.is_contiguous()
    assert_rel_close(out, expected, KERNEL_TOL[dtype], f"attention {_ids(shape)} {dtype}")


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_kernel_head_dims(device, monkeypatch, d):
    q, k, v = _inputs((1, 2, 17, 77, d), torch.float16, device)
    out = _run_kernel(monkeypatch, q, k, v)
    assert_rel_close(out, _oracle(q, k, v, d**-0.5), KERNEL_TOL[torch.float16], f"attention D={d}")


def _layout(kind, shape, dtype, device):
    """q, k, v with the strides a model hands over, never made contiguous."""
    b, h, n, m, d = shape
    if kind == "bnhd":  # projections reshaped to (B, N, H, D), then transposed: stride(seq) = H·D
        q = torch.randn(b, n, h, d).to(dtype).to(device).transpose(1, 2)
        k = torch.randn(b, m, h, d).to(dtype).to(device).transpose(1, 2)
        v = torch.randn(b, m, h, d).to(dtype).to(device).transpose(1, 2)
    elif kind == "expand":  # one text context shared by the batch: stride(batch) = 0
        q = torch.randn(b, h, n, d).to(dtype).to(device)
        k = torch.randn(1, h, m, d).to(dtype).to(device).expand(b, h, m, d)
        v = torch.randn(1, h, m, d).to(dtype).to(device).expand(b, h, m, d)
    elif kind == "strided_d":  # every other element of a wider buffer: stride(D) = 2
        q = torch.randn(b, h, n, 2 * d).to(dtype).to(device)[..., ::2]
        k = torch.randn(b, h, m, 2 * d).to(dtype).to(device)[..., ::2]
        v = torch.randn(b, h, m, 2 * d).to(dtype).to(device)[..., 1::2]
    elif kind == "offset":  # views one element into a wider buffer: data pointers off a 16-byte boundary
        q = torch.randn(b, h, n, d + 1).to(dtype).to(device)[..., 1:]
        k = torch.randn(b, h, m, d + 1).to(dtype).to(device)[..., 1:]
        v = torch.randn(b, h, m, d + 1).to(dtype).to(device)[..., 1:]
    elif kind == "k_dm":  # k stored as (B, H, D, M) and transposed: stride(M) = 1
        q = torch.randn(b, h, n, d).to(dtype).to(device)
        k = torch.randn(b, h, d, m).to(dtype).to(device).transpose(2, 3)
        v = torch.randn(b, h, m, d).to(dtype).to(device)
    else:
        raise AssertionError(kind)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["bnhd", "expand", "strided_d", "offset", "k_dm"])
def test_kernel_any_strides(device, monkeypatch, kind, dtype):
    shape = (2, 2, 70, 77, 40)
    q, k, v = _layout(kind, shape, dtype, device)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    before = [t.clone() for t in (q, k, v)]
    expected = _oracle(q, k, v, 40**-0.5)
    out = _run_kernel(monkeypatch, q, k, v)
    assert_rel_close(out, expected, KERNEL_TOL[dtype], f"attention layout {kind} {dtype}")
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "the kernel modified its input"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.3, -0.7, 0.0])
def test_kernel_custom_scale(device, monkeypatch, scale, dtype):
    q, k, v = _inputs((1, 2, 40, 77, 64), dtype, device)
    out = _run_kernel(monkeypatch, q, k, v, scale=scale)
    assert_rel_close(out, _oracle(q, k, v, scale), KERNEL_TOL[dtype], f"attention scale={scale} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_huge_scores(device, monkeypatch, dtype):
    """Scores in the thousands: the online softmax must rescale, never overflow (exp of raw scores would)."""
    q, k, v = _inputs((1, 1, 70, 130, 64), dtype, device, scale_q=40.0)
    out = _run_kernel(monkeypatch, q, k, v, scale=1.0)
    expected = _oracle(q, k, v, 1.0)
    assert_rel_close(out, expected, KERNEL_TOL[dtype], f"attention huge scores {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_exact_ties(device, monkeypatch, dtype):
    """All keys equal: every row is the plain mean of v (ties in the max across tiles, masked tail included)."""
    b, h, n, m, d = 1, 2, 9, 77, 32
    q = torch.randn(b, h, n, d).to(dtype).to(device)
    k = torch.randn(b, h, 1, d).to(dtype).to(device).expand(b, h, m, d)
    v = torch.randn(b, h, m, d).to(dtype).to(device)
    out = _run_kernel(monkeypatch, q, k, v)
    expected = v.double().cpu().mean(dim=2, keepdim=True).expand(b, h, n, d)
    assert_rel_close(out, expected, KERNEL_TOL[dtype], f"attention ties {dtype}")


@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_every_tuned_config(device, monkeypatch, d, dtype):
    """Each config the autotuner may pick for this shape, on any GPU generation (sm_80 and sm_90 rules, and none),
    gives the right answer (and, on a GPU, compiles)."""
    kernels = dispatch.load_kernels("attention")
    q, k, v = _inputs((1, 2, 130, 77, d), dtype, device)
    expected = _oracle(q, k, v, 0.2)
    block_d = max(16, 1 << (d - 1).bit_length())
    configs = {}
    for arch in (None, 80, 90):
        chosen = kernels._candidates(kernels._CONFIGS, 77, block_d, q.element_size(), arch)
        assert chosen
        configs.update({str(c): c for c in chosen})
    for config in configs.values():
        poison_empty(monkeypatch)
        out = kernels.attention(q, k, v, 0.2, config=config)
        monkeypatch.undo()
        assert_rel_close(out, expected, KERNEL_TOL[dtype], f"attention D={d} {dtype} config {config}")


@pytest.mark.parametrize("d", [40, 128])
def test_kernel_every_tf32_config(device, monkeypatch, d):
    """fp32 with TF32 allowed: each config the autotuner may pick on sm_80 / sm_90 (or with no arch rule) runs the
    tensor-core kernel and stays within TF32's error."""
    kernels = dispatch.load_kernels("attention")
    q, k, v = _inputs((1, 2, 70, 77, d), torch.float32, device)
    expected = _oracle(q, k, v, 0.2)
    block_d = max(16, 1 << (d - 1).bit_length())
    configs = {str(c): c for arch in (None, 80, 90)
               for c in kernels._candidates(kernels._CONFIGS, 77, block_d, 4, arch)}
    monkeypatch.setattr(kernels, "_launch_fp32", lambda *a: pytest.fail("TF32 at D ≤ 128 takes the tensor-core kernel"))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        for config in configs.values():
            out = kernels.attention(q, k, v, 0.2, config=config)
            assert_rel_close(out, expected, 5e-3, f"attention TF32 D={d} config {config}")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("d", [16, 40, 64, 160])
def test_fp32_kernel_config(device, monkeypatch, d):
    """Exact fp32 runs on its own kernel (head-dim slices, column blocks), with the config the host picks for each
    head dim on a GPU and the interpreter's (several slices and column blocks)."""
    kernels = dispatch.load_kernels("attention")
    q, k, v = _inputs((1, 2, 70, 77, d), torch.float32, device)
    expected = _oracle(q, k, v, 0.2)
    for config in (kernels._fp32_config(d), kernels._INTERPRET_FP32_CONFIG):
        poison_empty(monkeypatch)
        out = kernels.attention(q, k, v, 0.2, config=config)
        monkeypatch.undo()
        assert_rel_close(out, expected, KERNEL_TOL[torch.float32], f"attention fp32 D={d} config {config}")


def test_fp32_takes_tf32_only_when_torch_allows_it(device, monkeypatch):
    """torch.set_float32_matmul_precision("high") is the opt-in: fp32 then runs the tensor-core kernel with TF32
    dots (10-bit mantissa operands, fp32 accumulation: ≈ 1e-3 relative error); "highest" (the default) keeps exact
    fp32 on the CUDA-core kernel."""
    kernels = dispatch.load_kernels("attention")
    q, k, v = _inputs((1, 2, 70, 77, 64), torch.float32, device)
    expected = _oracle(q, k, v, 0.2)
    calls = []
    original = kernels._launch_fp32
    monkeypatch.setattr(kernels, "_launch_fp32", lambda *a: (calls.append(a), original(*a)))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert kernels.tf32_enabled()
        out = kernels.attention(q, k, v, 0.2)
        assert not calls
        assert_rel_close(out, expected, 5e-3, "attention fp32 with TF32")
        torch.set_float32_matmul_precision("highest")
        assert not kernels.tf32_enabled()
        out = kernels.attention(q, k, v, 0.2)
        assert len(calls) == 1
        assert_rel_close(out, expected, KERNEL_TOL[torch.float32], "attention fp32 exact")
        torch.set_float32_matmul_precision("high")  # a head too wide for the tensor-core kernel: sliced, in TF32
        q, k, v = _inputs((1, 2, 70, 77, 160), torch.float32, device)
        out = kernels.attention(q, k, v, 0.2)
        assert len(calls) == 2 and calls[-1][-1] == "tf32"
        assert_rel_close(out, _oracle(q, k, v, 0.2), 5e-3, "attention fp32 D=160 with TF32")
    finally:
        torch.set_float32_matmul_precision(before)


def test_tf32_follows_torchs_newer_precision_settings():
    """torch ≥ 2.9's per-backend settings (``torch.backends.cuda.matmul.fp32_precision``) also opt in, and reading
    them never raises (``torch.get_float32_matmul_precision()`` does once the new API was used). In a subprocess:
    mixing the old and new APIs in one process makes torch's own getter raise for everything after."""
    import subprocess
    import sys

    code = """
import torch
from fastdiff.kernels import attention as a
assert not a.tf32_enabled()
torch.backends.cuda.matmul.fp32_precision = "tf32"
assert a.tf32_enabled()
torch.backends.cuda.matmul.fp32_precision = "ieee"
assert not a.tf32_enabled()
torch.backends.cuda.matmul.fp32_precision = "none"
torch.backends.fp32_precision = "tf32"
assert a.tf32_enabled()
torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # a CPU setting: no effect, no error
torch.backends.fp32_precision = "ieee"
assert not a.tf32_enabled()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_misaligned_inputs_are_copied_once_aligned(device, monkeypatch):
    kernels = dispatch.load_kernels("attention")
    q, k, v = _layout("offset", (1, 2, 40, 77, 64), torch.float16, device)
    assert all(t.data_ptr() % 16 for t in (q, k, v))
    copies = []
    original = kernels._aligned_copy
    monkeypatch.setattr(kernels, "_aligned_copy", lambda t: copies.append(t) or original(t))
    out = kernels.attention(q, k, v, 0.2)
    assert len(copies) == 3
    assert_rel_close(out, _oracle(q, k, v, 0.2), KERNEL_TOL[torch.float16], "attention misaligned")
    copies.clear()
    kernels.attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.2)
    assert not copies  # fresh allocations are aligned: no copy


@pytest.mark.parametrize("arch", [75, 80, 86, 89, 90])
@pytest.mark.parametrize("d", [16, 40, 64, 80, 128, 160])
def test_arch_rules_leave_a_config(arch, d):
    """Every head dim, key length and dtype keeps at least one config under each GPU generation's register rule."""
    kernels = dispatch.load_kernels("attention")
    block_d = max(16, 1 << (d - 1).bit_length())
    for m in (1, 77, 4096):
        for itemsize in (2, 4):
            chosen = kernels._candidates(kernels._CONFIGS, m, block_d, itemsize, arch)
            assert chosen and all(kernels._fits_arch(c, block_d, itemsize, arch) for c in chosen)
            # within the generation's shared memory (the last-resort 32×32 tile aside)
            for c in chosen:
                bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
                smem = itemsize * block_d * (bn + 2 * bm * c.num_stages)
                assert smem <= kernels._smem_budget(arch) or (bn, bm) == (32, 32), (arch, d, c)
    if arch == 80 and block_d == 256:
        assert [str(c) for c in kernels._candidates(kernels._CONFIGS, 77, 256, 2, 80)] == [
            str(c) for c in kernels._CONFIGS if c.kwargs == {"BLOCK_N": 32, "BLOCK_M": 32} and c.num_warps == 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter never autotunes")
def test_kernel_autotuned():
    q, k, v = _inputs((1, 2, 130, 77, 40), torch.float16, torch.device("cuda"))
    out = ops.attention(q, k, v, backend="triton")
    assert_rel_close(out, _oracle(q, k, v, 40**-0.5), KERNEL_TOL[torch.float16], "attention autotuned")


def test_kernel_default_scale_is_rsqrt_d(device):
    q, k, v = _inputs((1, 1, 10, 20, 80), torch.float32, device)
    default = ops.attention(q, k, v, backend="triton")
    explicit = ops.attention(q, k, v, scale=80**-0.5, backend="triton")
    assert torch.equal(default, explicit)


# --------------------------------------------------------------------------------------------- (b) reference vs naive
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_reference_matches_naive_float64(shape, dtype):
    q, k, v = _inputs(shape, dtype, "cpu")
    scale = 0.3
    out = reference.attention(q, k, v, scale)
    assert out.dtype == dtype
    assert_rel_close(out, _naive(q, k, v, scale), REFERENCE_TOL[dtype], f"reference {_ids(shape)} {dtype}")


def test_reference_path_is_what_backend_torch_runs():
    q, k, v = _inputs((1, 2, 5, 7, 32), torch.float32, "cpu")
    fastdiff.reset_counts()
    out = ops.attention(q, k, v, backend="torch")
    assert fastdiff.counts() == {("attention", "torch"): 1}
    assert rel_err(out, _naive(q, k, v, 32**-0.5)) < REFERENCE_TOL[torch.float32]


# --------------------------------------------------------------------------------------------- bad input
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q, KV = (2, 3, 5, 32), (2, 3, 7, 32)
BAD = [  # (q, k, v, kwargs) factory, exception, message fragment naming the argument
    (lambda: (_t(3, 5, 32), _t(*KV), _t(*KV), {}), ValueError, "q must have shape"),  # rank 3 q
    (lambda: (_t(*Q), _t(2, 3, 1, 7, 32), _t(*KV), {}), ValueError, "k must have shape"),  # rank 5 k
    (lambda: (_t(*Q), _t(*KV), _t(7, 32), {}), ValueError, "v must have shape"),  # rank 2 v
    (lambda: (_t(*Q), _t(1, 3, 7, 32), _t(*KV), {}), ValueError, "batch mismatch"),
    (lambda: (_t(*Q), _t(*KV), _t(2, 4, 7, 32), {}), ValueError, "head mismatch"),
    (lambda: (_t(*Q), _t(2, 3, 7, 64), _t(*KV), {}), ValueError, "head-dim mismatch"),
    (lambda: (_t(*Q), _t(*KV), _t(2, 3, 8, 32), {}), ValueError, "k and v must have the same sequence length"),
    (lambda: (_t(2, 3, 0, 32), _t(*KV), _t(*KV), {}), ValueError, "N ≥ 1"),  # empty query
    (lambda: (_t(*Q), _t(*KV, dtype=torch.float16), _t(*KV), {}), TypeError, "q, k and v must share one dtype"),
    (lambda: (_t(*Q, dtype=torch.bfloat16), _t(*KV, dtype=torch.bfloat16), _t(*KV, dtype=torch.float16), {}),
     TypeError, "q, k and v must share one dtype"),
    (lambda: (_t(*Q).to(torch.float64), _t(*KV), _t(*KV), {}), TypeError, "q must have dtype"),
    (lambda: (_t(*Q), torch.ones(KV, dtype=torch.int32), _t(*KV), {}), TypeError, "k must have dtype"),
    (lambda: (_t(*Q), _t(*KV, device="meta"), _t(*KV), {}), ValueError, "k is on meta"),  # a second device
    (lambda: (_t(*Q), _t(*KV), _t(*KV, device="meta"), {}), ValueError, "v is on meta"),
    (lambda: ([[1.0]], _t(*KV), _t(*KV), {}), TypeError, "q must be a torch.Tensor"),
    (lambda: (_t(*Q), None, _t(*KV), {}), TypeError, "k must be a torch.Tensor"),
    (lambda: (_t(*Q), _t(*KV), _t(*KV).numpy(), {}), TypeError, "v must be a torch.Tensor"),
    (lambda: (_t(*Q), _t(*KV), _t(*KV), {"scale": "0.1"}), TypeError, "scale must be a real number"),
    (lambda: (_t(*Q), _t(*KV), _t(*KV), {"scale": float("nan")}), ValueError, "scale must be finite"),
    (lambda: (_t(*Q), _t(*KV), _t(*KV), {"backend": "cuda"}), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make, exc, match", BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_before_any_work(make, exc, match):
    q, k, v, kwargs = make()
    fastdiff.reset_counts()
    with pytest.raises(exc, match=match):
        ops.attention(q, k, v, **kwargs)
    assert fastdiff.counts() == {}, "an implementation ran before the input was rejected"
