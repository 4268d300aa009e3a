"""fastdiff.ops.linear_step, the fused sampler update: the Triton kernel (interpreter on CPU, compiled on CUDA) vs the
reference, the reference vs the linear combinations written out by hand in float64, planted edge cases (zero
coefficients skip NaN terms, clamping, guidance, empty tensors, fp16/bf16, outputs that feed later outputs) and bad
input. The float64 oracle here is written fresh from the op's definition, not taken from fastdiff.reference.
"""

from __future__ import annotations

import pytest
import torch
from step_cases import kernel_path, skip_if_no_kernels
from utils import assert_rel_close, poison_empty

import fastdiff
from fastdiff import ops


def naive(x, m, inputs, rows, guidance_scale=None, clip=None):
    """Output j = Σ_i rows[j][i]·operand_i in float64, element by element over the flattened tensors."""
    x, m = x.double().flatten(), m.double()
    if guidance_scale is not None:
        u, c = m.chunk(2)
        m = u + guidance_scale * (c - u)
    operands = [x, m.flatten(), *(t.double().flatten() for t in inputs)]
    outs = []
    for j, row in enumerate(rows):
        out = torch.zeros_like(x)
        for k in range(len(x)):
            out[k] = sum(c * operands[i][k] for i, c in enumerate(row) if c != 0.0)
        if j == 0 and clip is not None:
            out = out.clamp(-clip, clip)
        outs.append(out)
        operands.append(out)
    return outs


def random_case(shape, n_inputs, n_outputs, dtype=torch.float32, guidance=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    m = torch.randn((2 * shape[0] if guidance else shape[0], *shape[1:]), generator=g).to(dtype=dtype, device=device)
    inputs = [torch.randn(shape, generator=g).to(dtype=dtype, device=device) for _ in range(n_inputs)]
    rows = [(torch.rand(2 + n_inputs + j, generator=g) * 4 - 2).tolist() for j in range(n_outputs)]
    return x, m, inputs, rows


@pytest.mark.parametrize("n_inputs", [0, 1, 3, 6])
@pytest.mark.parametrize("n_outputs", [1, 2, 3])
@pytest.mark.parametrize("guidance_scale", [None, 7.5])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_kernel_matches_reference_and_float64(device, monkeypatch, n_inputs, n_outputs, guidance_scale, clip):
    skip_if_no_kernels("triton")
    x, m, inputs, rows = random_case((3, 4, 9, 11), n_inputs, n_outputs, guidance=guidance_scale is not None,
                                     seed=n_inputs * 10 + n_outputs, device=device)
    ref = ops.linear_step(x, m, inputs, coefficients=rows, guidance_scale=guidance_scale, clip_sample_range=clip,
                          backend="torch")
    poison_empty(monkeypatch)
    fastdiff.reset_counts()
    got = ops.linear_step(x, m, inputs, coefficients=rows, guidance_scale=guidance_scale, clip_sample_range=clip,
                          backend="triton")
    assert fastdiff.counts() == {("linear_step", kernel_path(device)): 1}
    small = x[:1], (m[:1] if guidance_scale is None else torch.cat([m[:1], m[3:4]])), [t[:1] for t in inputs]
    oracle = naive(*small, rows, guidance_scale, clip)
    assert len(got) == len(ref) == n_outputs
    for j, (a, b, o) in enumerate(zip(got, ref, oracle)):
        assert a.dtype == b.dtype == torch.float32 and a.shape == x.shape
        assert_rel_close(a, b, 1e-6, f"kernel output {j}")
        assert_rel_close(b[:1].flatten(), o, 1e-6, f"reference output {j} vs float64")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (5, 7), (2, 1, 16, 16)], ids=str)
def test_low_precision_inputs_compute_in_fp32(device, dtype, tol, shape):
    skip_if_no_kernels("triton")
    x, m, inputs, rows = random_case(shape, 2, 2, dtype=dtype, guidance=True, device=device)
    inputs[1] = inputs[1].float()  # inputs may have another dtype than the sample (fp32 history)
    got = ops.linear_step(x, m, inputs, coefficients=rows, guidance_scale=3.0, backend="triton")
    oracle = naive(x, m, inputs, rows, 3.0)
    for j, (a, o) in enumerate(zip(got, oracle)):
        assert a.dtype == torch.float32
        assert_rel_close(a.flatten(), o, tol, f"output {j}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_coefficients_skip_nan_terms_and_nan_propagates_elsewhere(device, backend):
    skip_if_no_kernels(backend)
    x, m, inputs, _ = random_case((2, 3, 5), 2, 1, device=device)
    inputs[0] = torch.full_like(inputs[0], float("nan"))  # e.g. a history slot not filled yet
    x[0, 0, 0] = float("nan")
    out = ops.linear_step(x, m, inputs, coefficients=[[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 1.0]],
                          backend=backend)
    assert torch.isfinite(out[0]).all()  # x and inputs[0] have zero weight in row 0
    assert torch.equal(out[0], m.float() + 2.0 * inputs[1].float())
    assert torch.isnan(out[1][0, 0, 0]) and torch.isfinite(out[1].flatten()[1:]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clamp_applies_to_output_zero_before_later_rows_read_it(device, backend):
    skip_if_no_kernels(backend)
    x = torch.tensor([[-3.0, -0.5, 0.25, 4.0]], device=device)
    m = torch.zeros_like(x)
    first, second = ops.linear_step(x, m, [], coefficients=[[1.0, 0.0], [0.0, 0.0, 10.0]], clip_sample_range=1.0,
                                    backend=backend)
    assert first.tolist() == [[-1.0, -0.5, 0.25, 1.0]]
    assert second.tolist() == [[-10.0, -5.0, 2.5, 10.0]]


def test_threshold_runs_the_reference_and_matches_dynamic_thresholding():
    x, m, inputs, rows = random_case((3, 2, 4, 4), 1, 2, seed=3)
    x = x * 5
    fastdiff.reset_counts()
    got = ops.linear_step(x, m, inputs, coefficients=rows, threshold=(0.9, 2.0), backend="triton")
    assert fastdiff.counts() == {("linear_step", "torch"): 1}
    raw = naive(x, m, inputs, rows[:1])[0].reshape(x.shape)
    s = torch.quantile(raw.abs().reshape(3, -1), 0.9, dim=1).clamp(1, 2.0).reshape(3, 1, 1, 1)
    want0 = raw.clamp(-s, s) / s
    assert_rel_close(got[0], want0, 1e-6, "thresholded output 0")
    want1 = sum(c * t.double() for c, t in zip(rows[1], [x, m, inputs[0], want0]))
    assert_rel_close(got[1], want1, 1e-6, "output 1 reads the thresholded output 0")


def test_float64_runs_the_reference_in_float64():
    x, m, inputs, rows = random_case((2, 9), 1, 2)
    x, m, inputs = x.double(), m.double(), [t.double() for t in inputs]
    got = ops.linear_step(x, m, inputs, coefficients=rows, backend="triton")
    assert all(t.dtype == torch.float64 for t in got)
    for a, o in zip(got, naive(x, m, inputs, rows)):
        assert_rel_close(a.flatten(), o, 1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(device, backend):
    skip_if_no_kernels(backend)
    x = torch.zeros((0, 3), device=device)
    out = ops.linear_step(x, x, [x], coefficients=[[1.0, 1.0, 1.0]], backend=backend)
    assert out[0].shape == (0, 3)


def test_layouts_and_grad():
    x, m, inputs, rows = random_case((2, 4, 6, 6), 1, 2)
    cl = [t.to(memory_format=torch.channels_last) for t in (x, m, inputs[0])]
    a = ops.linear_step(cl[0], cl[1], [cl[2]], coefficients=rows, backend="triton")
    b = ops.linear_step(x, m, inputs, coefficients=rows, backend="torch")
    for u, v in zip(a, b):
        assert_rel_close(u, v, 1e-6)
    xg = x.clone().requires_grad_()
    out = ops.linear_step(xg, m, inputs, coefficients=rows)
    out[1].sum().backward()  # through the reference: d out1/dx = row1[0] + row1[-1]·row0[0]
    assert torch.allclose(xg.grad, torch.full_like(x, rows[1][0] + rows[1][-1] * rows[0][0]), rtol=1e-5)


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, m, i: ops.linear_step(x.numpy(), m, i, coefficients=[[1, 1]]), TypeError, "sample"),
    (lambda x, m, i: ops.linear_step(x, m.half(), i, coefficients=[[1, 1]]), TypeError, "model_output"),
    (lambda x, m, i: ops.linear_step(x, m[:1], i, coefficients=[[1, 1]]), ValueError, "model_output"),
    (lambda x, m, i: ops.linear_step(x, m, i, coefficients=[[1, 1]], guidance_scale=2.0), ValueError,
     "model_output"),
    (lambda x, m, i: ops.linear_step(x, m, [x[:1]], coefficients=[[1, 1, 1]]), ValueError, r"inputs\[0\]"),
    (lambda x, m, i: ops.linear_step(x, m, [x.long()], coefficients=[[1, 1, 1]]), TypeError, r"inputs\[0\]"),
    (lambda x, m, i: ops.linear_step(x, m, x, coefficients=[[1, 1]]), TypeError, "inputs"),
    (lambda x, m, i: ops.linear_step(x, m, [x] * 7, coefficients=[[1] * 9]), ValueError, "inputs"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1, 1]]), ValueError, r"coefficients\[0\]"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1], [1, 1]]), ValueError, r"coefficients\[1\]"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[]), ValueError, "coefficients"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1]] * 4), ValueError, "coefficients"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, float("nan")]]), ValueError, "coefficients"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, "a"]]), TypeError, "coefficients"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1]], clip_sample_range=-1.0), ValueError,
     "clip_sample_range"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1]], threshold=(1.5, 1.0)), ValueError,
     "threshold"),
    (lambda x, m, i: ops.linear_step(x, m, [], coefficients=[[1, 1]], backend="cuda"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(call, exc, match):
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    fastdiff.reset_counts()
    with pytest.raises(exc, match=match):
        call(x, m, [])
    assert fastdiff.counts() == {}  # nothing ran


def test_one_graph_node_under_compile():
    x, m, inputs, rows = random_case((2, 3, 4, 4), 2, 2)

    def f(x, m, a, b):
        return ops.linear_step(x, m, [a, b], coefficients=rows)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for u, v in zip(compiled(x, m, *inputs), f(x, m, *inputs)):
        assert_rel_close(u, v, 1e-6)
