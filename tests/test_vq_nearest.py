"""fastdiff.ops.vq_nearest: the native extension (C++ on CPU, CUDA where present) against exact float64 distances
and the PyTorch reference, planted ties and edge cases, validation, dispatch, and the registered op.

The native build is exercised, not skipped: if fastdiff._C cannot be imported or built just in time here, the
tests fail (CI has a compiler).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import dispatch, native, ops, reference

CPU_ISAS = ["auto", "avx512", "avx2", "generic"]  # FASTDIFF_CPU_ISA caps the CPU kernel; "auto": the best one here
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [  # (N, K, D)
    (1000, 300, 64),
    (97, 33, 7),  # nothing a multiple of any block (rows 12/96, columns 16/32/128, D slabs 16)
    (1237, 4099, 37),  # odd, K spans many panels and tiles
    (1, 1, 1),  # N = K = D = 1
    (500, 1, 16),  # K = 1
    (300, 50, 1),  # D = 1
    (13, 700, 300),  # D > every slab, few rows
    (0, 10, 8),  # N = 0
]


@pytest.fixture
def cpu_isa(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("FASTDIFF_CPU_ISA", request.param)
    return request.param


def exact_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances in float64 from the inputs' exact values."""
    z64, e64 = z.detach().double().cpu(), codebook.detach().double().cpu()
    return (z64 * z64).sum(1, keepdim=True) - 2 * z64 @ e64.t() + (e64 * e64).sum(1)


def check_nearest(z, codebook, indices, distances, what: str) -> None:
    """Every index is a minimiser within fp32 tolerance, and its returned distance is right; verbose on failure.

    The tolerance is that of fp32 arithmetic on ‖z‖² − 2 z·e + ‖e‖² (relative to the terms, not the result):
    a near-tie may resolve either way, a clearly farther code may not.
    """
    n = z.shape[0]
    assert indices.shape == (n,) and indices.dtype == torch.int64, f"{what}: indices {indices.shape} {indices.dtype}"
    assert distances.shape == (n,) and distances.dtype == torch.float32, f"{what}: distances {distances.dtype}"
    if n == 0:
        return
    exact = exact_distances(z, codebook)
    idx = indices.cpu()
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0], f"{what}: index out of range"
    scale = (z.double() ** 2).sum(1).cpu() + (codebook.double() ** 2).sum(1).max().cpu()
    tol = 2e-6 * scale * max(1.0, z.shape[1] ** 0.5) + 1e-30
    chosen = exact.gather(1, idx[:, None]).squeeze(1)
    best = exact.min(1).values
    bad = (chosen - best > tol).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)}/{n} rows chose a farther code; row {i}: chose {int(idx[i])} at {chosen[i]:.9g}, "
            f"best {int(exact[i].argmin())} at {best[i]:.9g} (tolerance {tol[i]:.3g})")
    err = (distances.double().cpu() - chosen).abs()
    bad = (err > tol + 1e-6 * chosen.abs()).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise AssertionError(f"{what}: {len(bad)}/{n} distances off; row {i}: got {float(distances[i]):.9g}, "
                             f"exact {chosen[i]:.9g}")
    assert (distances >= 0).all() and torch.isfinite(distances).all(), f"{what}: negative or non-finite distance"


# --------------------------------------------------------------------------------------------- the build
def test_native_extension_is_built(monkeypatch):
    """The extension loads here (prebuilt or JIT) and fastdiff.info() reports the native path."""
    assert native.load(), f"the native extension is not available: {native.status()}"
    assert "cpu=" in native.status(), native.status()
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert fastdiff.info()["ops"]["vq_nearest"] == "native"
    assert dispatch.select("vq_nearest", torch.device("cpu")) == "native"
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert dispatch.select("vq_nearest", torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_exact(shape, dtype, device):
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(dtype)
    fastdiff.reset_counts()
    indices, distances = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    assert fastdiff.counts() == {("vq_nearest", "native"): 1}
    assert indices.device == z.device
    check_nearest(z, codebook, indices, distances, f"native {device} {dtype} {shape}")
    ref_idx, ref_dist = ops.vq_nearest(z, codebook, return_distances=True, backend="torch")
    check_nearest(z, codebook, ref_idx, ref_dist, f"reference {device} {dtype} {shape}")
    # Both are right; they may differ only on near-ties, which random data almost never has.
    assert int((indices != ref_idx).sum()) <= max(1, n // 500), "native and reference disagree on many rows"


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("shape", [(1000, 300, 64), (97, 33, 7), (250, 1000, 256), (300, 129, 130), (5, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_every_cpu_microkernel(shape, cpu_isa):
    """AVX-512, AVX2 and the portable kernel all agree with the exact distances (each where the CPU has it)."""
    n, k, d = shape
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    indices, distances = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    check_nearest(z, codebook, indices, distances, f"isa={cpu_isa}")
    if cpu_isa == "generic":
        assert "cpu=generic" in native.status(), native.status()


def test_amx_screening_equals_avx512(monkeypatch):
    """Where AMX runs, its bf16 screening + fp32 re-rank returns the AVX-512 kernel's answer bit for bit: random
    data, clustered codes (many candidates: the per-row fallback), exact ties, huge and non-finite values."""
    if "cpu=amx" not in native.status():
        pytest.skip(f"no AMX here ({native.status()})")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 160, generator=g)
    z_ties = torch.randint(-3, 4, (300, 136), generator=g).float()
    bad = torch.randn(300, 160, generator=g)
    bad[7, 3], bad[200, 5] = float("nan"), 1e20
    cases = [
        (torch.randn(1000, 200, generator=g), torch.randn(300, 200, generator=g)),
        (torch.randn(97, 129, generator=g), torch.randn(1000, 129, generator=g)),
        (base[torch.randint(0, 40, (500,), generator=g)] + 1e-3 * torch.randn(500, 160, generator=g),
         torch.cat([base + 1e-4 * torch.randn(40, 160, generator=g) for _ in range(8)])),
        (z_ties, torch.cat([z_ties[:100], z_ties[:100]])),
        (1e4 * torch.randn(300, 148, generator=g), 1e4 * torch.randn(130, 148, generator=g)),
        (torch.randn(400, 160, generator=g).bfloat16(), torch.randn(300, 160, generator=g).bfloat16()),
        (bad, torch.randn(200, 160, generator=g)),
    ]
    for z, codebook in cases:
        monkeypatch.delenv("FASTDIFF_CPU_ISA", raising=False)
        amx = torch.ops.fastdiff.vq_nearest(z, codebook)
        monkeypatch.setenv("FASTDIFF_CPU_ISA", "avx512")
        avx512 = torch.ops.fastdiff.vq_nearest(z, codebook)
        assert torch.equal(amx[0], avx512[0]), (tuple(z.shape), tuple(codebook.shape))
        assert torch.equal(amx[1], avx512[1]) or bool(amx[1].isnan().any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_lowest_index(dtype, device):
    """Small integers make every distance exact in fp32, so ties are genuine: both paths must pick the lowest index.

    Duplicate codebook rows are planted across 16/32-column lanes and panels.
    """
    g = torch.Generator().manual_seed(1)
    codebook = torch.randint(-3, 4, (200, 24), generator=g).float()
    for src, dst in ((3, 40), (3, 199), (17, 18), (0, 33), (31, 32), (64, 130)):
        codebook[dst] = codebook[src]
    z = torch.cat([codebook[[40, 199, 18, 33, 32, 130]], torch.randint(-3, 4, (500, 24), generator=g).float()])
    expected = exact_distances(z, codebook).argmin(1)  # float64 exact; argmin returns the first minimum
    z, codebook = z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)
    for backend in ("native", "torch"):
        got = ops.vq_nearest(z, codebook, backend=backend).cpu()
        bad = (got != expected).nonzero().flatten()
        assert len(bad) == 0, (f"{backend}: {len(bad)} rows not the lowest tied index; row {int(bad[0])}: "
                               f"got {int(got[bad[0]])}, expected {int(expected[bad[0]])}")
    assert ops.vq_nearest(z[:6], codebook, backend="native").tolist() == [3, 3, 17, 0, 31, 64]


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
def test_duplicate_rows_random_values(cpu_isa):
    """With arbitrary floats a duplicated row is computed bit for bit like its original: lowest index wins."""
    codebook = torch.randn(300, 40)
    for src, dst in ((5, 6), (5, 77), (100, 299), (31, 32)):
        codebook[dst] = codebook[src]
    z = torch.cat([codebook[[6, 77, 299, 32]] + 1e-3 * torch.randn(4, 40), torch.randn(100, 40)])
    got = ops.vq_nearest(z, codebook, backend="native")
    assert got[:4].tolist() == [5, 5, 100, 31]
    assert not any(i in (6, 77, 299, 32) for i in got.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_large_magnitudes(device):
    z = 1e4 * torch.randn(700, 48, device=device)
    codebook = 1e4 * torch.randn(130, 48, device=device)
    indices, distances = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    check_nearest(z, codebook, indices, distances, "1e4 magnitudes")


@pytest.mark.parametrize("device", DEVICES)
def test_near_ties(device):
    """Codes a hair apart: either may win, but only if its distance equals the minimum within fp32 tolerance."""
    base = torch.randn(64, 32)
    codebook = torch.cat([base, base + 1e-6 * torch.randn(64, 32)]).to(device)
    z = (base + 0.1 * torch.randn(64, 32)).repeat(8, 1).to(device)
    indices, distances = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    check_nearest(z, codebook, indices, distances, "near ties")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Strided views give exactly the results of their contiguous copies (no copies needed on CPU)."""
    z = torch.randn(300, 80, device=device)[:, ::2]  # (300, 40), stride (80, 2)
    codebook = torch.randn(40, 90, device=device).t()  # (90, 40), column-major
    expanded = torch.randn(1, 40, device=device).expand(7, 40)  # stride 0 rows
    for zz in (z, expanded, z[::3]):
        i1, d1 = ops.vq_nearest(zz, codebook, return_distances=True, backend="native")
        i2, d2 = ops.vq_nearest(zz.contiguous(), codebook.contiguous(), return_distances=True, backend="native")
        assert torch.equal(i1, i2) and torch.equal(d1, d2)
    assert len(set(ops.vq_nearest(expanded, codebook, backend="native").tolist())) == 1


def test_output_written_everywhere(monkeypatch):
    """Results do not depend on what the output memory held (the op allocates with at::empty)."""
    z, codebook = torch.randn(333, 20), torch.randn(77, 20)
    first = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    torch.empty(10_000_000).fill_(float("nan"))  # recycle memory holding garbage
    second = ops.vq_nearest(z, codebook, return_distances=True, backend="native")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.isfinite(second[1]).all()


# --------------------------------------------------------------------------------------------- the reference
def test_reference_chunks_bound_memory(monkeypatch):
    """The reference never forms more than 2**22 distances at once and gives the same answer for any chunking."""
    shapes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    z, codebook = torch.randn(5000, 8), torch.randn(3000, 8)
    monkeypatch.setattr(torch, "addmm", spy)
    idx, dist = reference.vq_nearest(z, codebook)
    assert len(shapes) > 1 and all(r * k <= 1 << 22 for r, k in shapes), shapes
    idx7, dist7 = reference.vq_nearest(z, codebook, chunk_size=7)
    assert torch.equal(idx, idx7) and torch.allclose(dist, dist7)
    assert reference.vq_nearest(torch.randn(0, 8), codebook)[0].shape == (0,)


# --------------------------------------------------------------------------------------------- validation
BAD_INPUTS = [
    (lambda: (torch.randn(4, 3, 2), torch.randn(5, 2)), ValueError, "z must have shape"),
    (lambda: (torch.randn(6), torch.randn(5, 6)), ValueError, "z must have shape"),
    (lambda: (torch.randn(4, 3), torch.randn(5)), ValueError, "codebook must have shape"),
    (lambda: (torch.randn(4, 3), torch.randn(5, 4)), ValueError, "codebook must have z's D=3"),
    (lambda: (torch.randn(4, 3), torch.randn(0, 3)), ValueError, "codebook must have at least one row"),
    (lambda: (torch.randn(4, 0), torch.randn(2, 0)), ValueError, "D ≥ 1"),
    (lambda: (torch.randn(4, 3), torch.randn(5, 3).half()), TypeError, "codebook must have z's dtype"),
    (lambda: (torch.randint(0, 5, (4, 3)), torch.randn(5, 3)), TypeError, "z must have dtype"),
    (lambda: (torch.randn(4, 3), torch.randint(0, 5, (5, 3))), TypeError, "codebook must have dtype"),
    (lambda: (torch.randn(4, 3).double(), torch.randn(5, 3).double()), TypeError, "z must have dtype"),
    (lambda: ([[1.0, 2.0]], torch.randn(5, 2)), TypeError, "z must be a torch.Tensor"),
    (lambda: (torch.randn(4, 3), torch.randn(5, 3, device="meta")), ValueError, "codebook is on meta"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_inputs(make, exc, match):
    z, codebook = make()
    with pytest.raises(exc, match=match):
        ops.vq_nearest(z, codebook)


def test_bad_options():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="backend"):
        ops.vq_nearest(z, codebook, backend="fast")
    with pytest.raises(ValueError, match="no Triton kernel"):
        ops.vq_nearest(z, codebook, backend="triton")
    with pytest.raises(TypeError, match="return_distances"):
        ops.vq_nearest(z, codebook, return_distances=1)


def test_registered_op_validates():
    """torch.ops.fastdiff.vq_nearest called directly checks its inputs too (ValueError/TypeError from C++)."""
    assert native.load(), native.status()
    with pytest.raises(ValueError, match="D="):
        torch.ops.fastdiff.vq_nearest(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        torch.ops.fastdiff.vq_nearest(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.fastdiff.vq_nearest(torch.randn(4, 3).double(), torch.randn(5, 3).double())


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_paths(monkeypatch):
    z, codebook = torch.randn(50, 8), torch.randn(9, 8)
    cases = [("torch", None, "torch"), ("auto", None, "native"), ("auto", "torch", "torch"),
             ("torch", "native", "native"), ("native", None, "native")]
    for env, backend, path in cases:
        monkeypatch.setenv("FASTDIFF_BACKEND", env)
        fastdiff.reset_counts()
        ops.vq_nearest(z, codebook, backend=backend)
        assert fastdiff.counts() == {("vq_nearest", path): 1}, (env, backend, fastdiff.counts())


def test_gradients_take_the_reference(monkeypatch):
    """Distances that need gradients come from the differentiable reference; indices alone use the extension."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    z = torch.randn(20, 6, requires_grad=True)
    codebook = torch.randn(7, 6)
    fastdiff.reset_counts()
    _, dist = ops.vq_nearest(z, codebook, return_distances=True)
    dist.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    ops.vq_nearest(z, codebook)
    assert fastdiff.counts() == {("vq_nearest", "torch"): 1, ("vq_nearest", "native"): 1}


def test_unavailable_extension_falls_back_once(monkeypatch, caplog):
    """Without the extension: the reference runs after ONE warning; backend='native' raises."""
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_error", "no compiler (simulated)")
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    z, codebook = torch.randn(30, 4), torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        first = ops.vq_nearest(z, codebook)
        second = ops.vq_nearest(z, codebook)
    assert torch.equal(first, second)
    warnings = [r for r in caplog.records if "vq_nearest" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler (simulated)" in warnings[0].getMessage()
    assert dispatch.select("vq_nearest", torch.device("cpu")) == "torch"
    assert native.status().startswith("unavailable")
    with pytest.raises(RuntimeError, match="backend='native'"):
        ops.vq_nearest(z, codebook, backend="native")


# --------------------------------------------------------------------------------------------- the registered op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    assert native.load(), native.status()
    for n in (37, 0):
        z = torch.randn(n, 12, device=device).to(dtype)
        codebook = torch.randn(9, 12, device=device).to(dtype)
        torch.library.opcheck(torch.ops.fastdiff.vq_nearest.default, (z, codebook))


def test_torch_compile_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) traces ops.vq_nearest to the one registered op (its fake gives the shapes)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert native.load(), native.status()  # the first call (which may build) happens eagerly

    def quantise(z, codebook):
        idx, dist = ops.vq_nearest(z, codebook, return_distances=True)
        return codebook[idx], dist.sum()

    z, codebook = torch.randn(100, 16), torch.randn(30, 16)
    compiled = torch.compile(quantise, fullgraph=True, backend="eager")
    got, expected = compiled(z, codebook), quantise(z, codebook)
    assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1])


@pytest.mark.parametrize("order", ["extension first", "fastdiff first"])
def test_coexists_with_python_ops_in_any_import_order(order):
    """The C++ TORCH_LIBRARY_FRAGMENT and fastdiff.ops' Python custom ops share the namespace whichever loads first."""
    assert native.load(), native.status()
    library = native.status().split(" ", 2)[1]  # "prebuilt PATH (...)" or "jit PATH (...)"
    load = f"torch.ops.load_library({library!r})"
    steps = [load, "import fastdiff.ops"] if order == "extension first" else ["import fastdiff.ops", load]
    names = ("vq_nearest", "group_norm_silu", "attention", "ddim_step", "ddpm_step")
    code = "; ".join(["import torch", *steps, f"assert all(hasattr(torch.ops.fastdiff, n) for n in {names!r})",
                      "print(torch.ops.fastdiff.vq_nearest(torch.randn(5, 3), torch.randn(2, 3))[0].shape)"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fastdiff.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([5])" in result.stdout
