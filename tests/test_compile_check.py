"""The AOT compile check (``fastdiff.kernels.compile_check``): every launch the host code makes compiles for sm_90 and
sm_80 without spills, within the shared-memory limit, on tensor cores for fp16/bf16 attention — and the check fails on
planted defects.

Compiling needs Triton without its interpreter, so each check runs in a subprocess without ``TRITON_INTERPRET``
(this suite sets it for the kernel tests). The full sweep (``--full``, writes docs/kernels.md) runs when
``FASTDIFF_FULL_COMPILE_CHECK=1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from fastdiff.kernels import compile_check as cc  # noqa: E402  (after the importorskip)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"_attention_kernel", "_attention_fp32_kernel", "_group_norm_silu_kernel", "_group_norm_stats_kernel",
            "_group_norm_silu_apply_kernel", "_ddim_step_kernel", "_ddpm_step_kernel", "_linear_step_kernel"}


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _python(code: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_compiler_env(),
                          capture_output=True, text=True, timeout=timeout)


def _check(tmp_path, *args, timeout: int = 900):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "fastdiff.kernels.compile_check", "-q", "--json", str(out), *args],
                          cwd=tmp_path, env=_compiler_env(), capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        return proc, None
    saved = json.loads(out.read_text())
    assert saved["triton"] == triton.__version__
    return proc, saved["results"]


def _assert_clean(proc, results):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert results, "no launches captured"
    assert {r["kernel"] for r in results} == FAMILIES
    assert {r["arch"] for r in results} == {80, 90}
    for r in results:
        assert r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= cc.ARCHS[r["arch"]]["smem_per_block"], r
        assert r["ctas_per_sm"] >= 1, r
        if r["kernel"].startswith("_attention") and r["dtype"] in ("fp16", "bf16", "tf32"):
            assert r["tensor_cores"] in ("wgmma", "mma.sync"), r
            if r["arch"] == 80:
                assert r["tensor_cores"] == "mma.sync", r  # no wgmma before Hopper


def test_fast_subset_compiles_clean_for_sm90_and_sm80(tmp_path):
    proc, results = _check(tmp_path)
    _assert_clean(proc, results)
    # the autotuner's pruned list, not one config: several attention configs per dtype and head dim
    fp16 = {r["config"] for r in results if r["kernel"] == "_attention_kernel" and r["dtype"] == "fp16"}
    assert len(fp16) >= 4


@pytest.mark.skipif(os.environ.get("FASTDIFF_FULL_COMPILE_CHECK") != "1",
                    reason="the full sweep takes tens of minutes; FASTDIFF_FULL_COMPILE_CHECK=1 runs it")
def test_full_sweep_compiles_clean_and_writes_the_report(tmp_path):
    # this machine's Triton writes docs/kernels.md; the GPU image's (3.6, .ci/triton36_check.sh) its own report
    name = "kernels-triton-3.6.md" if triton.__version__.startswith("3.6") else "kernels.md"
    report = os.path.join(ROOT, "docs", name)
    proc, results = _check(tmp_path, "--full", "--write", report, timeout=3 * 3600)
    _assert_clean(proc, results)
    assert "## Problems\n\nNone." in open(report).read()


def test_check_fails_on_a_planted_spill(tmp_path):
    """One warp holding a 16384-element tile live across a reduction: 512 values per thread, far past 255 registers."""
    (tmp_path / "planted.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def spilling_kernel(X, Y, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(X + offs)
            tl.store(Y + offs, x * tl.sum(x, 0) + tl.max(x, 0))
    """))
    proc = _python("""
        import json, torch
        from fastdiff.kernels import compile_check as cc
        import planted
        with cc.capturing(90) as launches:
            launches.case["name"] = "planted spill"
            x = torch.empty(16384)
            planted.spilling_kernel[(1,)](x, x, BLOCK=16384, num_warps=1)
        results = [cc.compile_launch(launch) for launch in launches]
        print(json.dumps(cc.problems(results)))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) == 1 and "spilling_kernel sm_90 [BLOCK=16384, warps=1" in found[0] and "spills" in found[0]


def test_check_fails_on_a_planted_compile_error(tmp_path):
    """A kernel whose block is not a power of two: Triton's front end refuses it; the check reports, not raises."""
    (tmp_path / "planted.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def broken_kernel(X, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs) + 1)
    """))
    proc = _python("""
        import json, torch
        from fastdiff.kernels import compile_check as cc
        import planted
        with cc.capturing(80) as launches:
            launches.case["name"] = "planted compile error"
            planted.broken_kernel[(1,)](torch.empty(3), BLOCK=3)
        results = [cc.compile_launch(launch) for launch in launches]
        print(json.dumps([r.error for r in results]))
        print(json.dumps(cc.problems(results)))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors, found = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert len(errors) == 1 and errors[0] and len(found) == 1 and "compile error" in found[0]


def _result(kernel="_attention_kernel", dtype="fp16", arch=90, **fields):
    launch = SimpleNamespace(kernel=kernel, signature={"Q": f"*{dtype}"}, case="synthetic",
                             target=SimpleNamespace(arch=arch), options=SimpleNamespace(num_warps=4, num_stages=2),
                             config=lambda: "BLOCK_N=64, BLOCK_M=64, warps=4, stages=2", named_constexprs=dict)
    base = {"registers": 128, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 1024, "tensor_cores": "wgmma"}
    return cc.Result(launch, **{**base, **fields})


def test_problems_names_each_rule():
    assert cc.problems([_result()]) == []
    assert cc.problems([_result(kernel="_ddim_step_kernel", tensor_cores="")]) == []  # no MMA expected there
    too_big = cc.ARCHS[80]["smem_per_block"] + 1
    (smem,) = cc.problems([_result(arch=80, shared=too_big, tensor_cores="mma.sync")])
    assert f"{too_big} B shared memory" in smem and "sm_80" in smem
    (scalar,) = cc.problems([_result(dtype="bf16", tensor_cores="")])
    assert "no tensor-core instruction" in scalar
    assert cc.problems([_result(dtype="fp32", tensor_cores="")]) == []
    (spill,) = cc.problems([_result(spill_loads=8)])
    assert "spills" in spill
    (error,) = cc.problems([_result(error="CompilationError: boom")])
    assert "compile error: CompilationError: boom" in error


def test_occupancy_estimate():
    r = _result(registers=128, shared=40 * 1024)
    # 128 regs × 32 lanes × 4 warps = 16 Ki registers → 4 blocks; 228 KiB / 41 KiB → 5; 64 warps / 4 → 16
    assert r.ctas_per_sm() == 4
    assert dataclasses.replace(r, shared=100 * 1024).ctas_per_sm() == 2
    assert dataclasses.replace(r, registers=255).ctas_per_sm() == 2


def test_capturing_refuses_unknown_archs_and_the_interpreter():
    with pytest.raises(ValueError, match="arch must be one of"):
        with cc.capturing(75):
            pass
    if cc.target.INTERPRET:
        with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
            with cc.capturing(90):
                pass


def test_tuned_config_matches_the_autotuners_own_cache_key(tmp_path):
    """Inside a CUDA-graph capture attention reads the autotuner's choice from its cache instead of tuning; the key
    it builds must be the one this Triton version's autotuner stores (checked with the autotuner run for real, its
    benchmark replaced by the capture)."""
    proc = _python("""
        import torch
        from fastdiff.kernels import attention, compile_check as cc
        with cc.capturing(90) as launches:
            launches.case["name"] = "autotune"
            q = torch.empty(1, 2, 300, 64, dtype=torch.float16)
            k = torch.empty(1, 2, 77, 64, dtype=torch.float16)
            attention.attention(q, k, k, 0.1)
            chosen = attention._tuned_config(300, 77, 64, torch.float16)
            print(chosen is not None and chosen in attention._CONFIGS)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_report_from_saved_results(tmp_path):
    """--report-from writes the markdown of an earlier run without compiling: a summary per kernel, arch and dtype,
    one row per distinct compile result with its launch count, and the problems."""
    rows = [_result(registers=r).to_row() for r in (128, 128, 200)] + [_result(spill_stores=16).to_row()]
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"triton": "9.9.9", "results": rows}))
    report = tmp_path / "kernels.md"
    assert cc.main(["--report-from", str(saved), "--write", str(report)]) == 1  # the planted spill is a problem
    text = report.read_text()
    assert "(triton 9.9.9)" in text
    assert "| _attention_kernel | sm_90 | fp16 | 4 | 1 | 128–200 | 16 |" in text
    assert "| 2 | synthetic |" in text  # the two identical results are one row
    assert "## Problems" in text and "spills 16 B stores" in text
