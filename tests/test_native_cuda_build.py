"""The CUDA side of the native extension without needing a GPU for most of it.

1. fastdiff.native's just-in-time CUDA build: where CUDA is usable but the loaded extension has no CUDA kernel for
   vq_nearest (a fastdiff._C built without nvcc, say), the CUDA sources are built once per process and loaded next
   to it; a failure is logged once and reported by native.status(), and the CPU kernels stay. torch.cuda.is_available
   and the build function are mocked, so this runs on any machine. The mechanism the real build relies on (a library
   linked against the already loaded extension resolves fastdiff::check_vq_inputs from it) is checked with a small
   C++ stand-in (slow: one compile), and end to end where there is a GPU and nvcc.
2. The CUDA VQ kernels compiled by nvcc with ``-Xptxas -v`` for sm_80 and sm_90 (skipped without nvcc): no
   instantiation spills and none needs more than 128 registers, the bound that __launch_bounds__(256, 2) sets so
   that two blocks of vq_search_kernel are resident per multiprocessor.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import fastdiff
from fastdiff import dispatch, native

JIT_LIBRARY = "/cache/fastdiff_C_cuda_0123/fastdiff_C_cuda_0123.so"  # what the mocked CUDA build "returns"


# --------------------------------------------------------------------------------------------- the JIT CUDA build
@pytest.fixture
def loader(monkeypatch):
    """native with its load state reset (restored afterwards): the extension that really loaded here comes back
    from a mocked fastdiff._C import, the dispatcher's CUDA kernel and the CUDA build are simulated."""
    assert native.load(), native.status()
    library = native._library
    assert library, native.status()
    for name, value in (("_loaded", None), ("_origin", ""), ("_error", ""), ("_kernels", {}), ("_library", ""),
                        ("_cuda_jit", None)):
        monkeypatch.setattr(native, name, value)
    for var in ("FASTDIFF_NO_JIT", "FASTDIFF_NATIVE", "FASTDIFF_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(native, "_import_prebuilt", lambda: library)
    kernels = {"CPU": True, "CUDA": False}  # what the dispatcher has for fastdiff::<op>
    monkeypatch.setattr(native, "_has_dispatch_kernel", lambda op, key: kernels[key])
    monkeypatch.setattr(native, "_cuda_toolchain_problem", lambda: "")  # nvcc and a CUDA torch "present"
    builds = []

    def build(base_library: str) -> str:  # success: the loaded library registers the CUDA kernel
        builds.append(base_library)
        kernels["CUDA"] = True
        return JIT_LIBRARY

    monkeypatch.setattr(native, "_jit_build_cuda", build)
    monkeypatch.setattr(dispatch, "_warned", set())

    def cuda_available(value: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: value)

    cuda_available(True)
    return SimpleNamespace(library=library, kernels=kernels, builds=builds, cuda_available=cuda_available)


def reload() -> bool:
    """load() again as a new first use would (the CUDA build's outcome is per process and stays)."""
    native._loaded = None
    return native.load()


def test_cuda_jit_build_once_when_the_loaded_extension_has_no_cuda_kernel(loader, monkeypatch, caplog):
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert native.load(), native.status()
    assert loader.builds == [loader.library]  # linked against the extension that loaded
    assert native.has_kernel("vq_nearest", "cuda") and native.has_kernel("vq_nearest", "cpu")
    assert native.status().startswith(f"prebuilt {loader.library} (")
    assert native.status().endswith(f"; CUDA kernels: jit {JIT_LIBRARY}"), native.status()
    assert any("building them just in time" in r.getMessage() for r in caplog.records), caplog.text
    assert dispatch.select("vq_nearest", torch.device("cuda")) == "native"
    for _ in range(3):
        assert native.load() and reload()
        native.has_kernel("vq_nearest", "cuda")
    assert len(loader.builds) == 1


def test_cuda_jit_failure_falls_back_once_and_is_reported(loader, monkeypatch, caplog):
    def broken(base_library: str) -> str:
        loader.builds.append(base_library)
        raise RuntimeError("Error building extension 'fastdiff_C_cuda_0123': nvcc fell over")

    monkeypatch.setattr(native, "_jit_build_cuda", broken)
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert native.load(), native.status()  # the CPU kernels are still there
        assert reload() and native.load()
    assert len(loader.builds) == 1  # failed once, never retried in this process
    assert native.has_kernel("vq_nearest", "cpu") and not native.has_kernel("vq_nearest", "cuda")
    assert "CUDA kernels: just-in-time CUDA build failed: RuntimeError: Error building extension" in native.status()
    assert "nvcc fell over" in native.status()
    failures = [r for r in caplog.records if "nvcc fell over" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING, caplog.text
    # CUDA tensors take the reference, with one warning that says why.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert dispatch.select("vq_nearest", torch.device("cuda")) == "torch"
        assert dispatch.select("vq_nearest", torch.device("cuda")) == "torch"
    assert len(caplog.records) == 1 and "nvcc fell over" in caplog.records[0].getMessage(), caplog.text
    with pytest.raises(RuntimeError, match="nvcc fell over"):
        dispatch.select("vq_nearest", torch.device("cuda"), backend="native")
    assert dispatch.select("vq_nearest", torch.device("cpu")) == "native"


def test_cuda_jit_build_that_registers_nothing_is_a_failure(loader, monkeypatch):
    monkeypatch.setattr(native, "_jit_build_cuda", lambda base: loader.builds.append(base) or JIT_LIBRARY)
    assert native.load()
    assert loader.builds == [loader.library] and not native.has_kernel("vq_nearest", "cuda")
    assert "registered no CUDA kernel" in native.status(), native.status()


def test_no_cuda_build_without_cuda(loader):
    loader.cuda_available(False)
    assert native.load() and reload()
    assert loader.builds == []
    assert "CUDA kernels" not in native.status(), native.status()


def test_no_cuda_build_when_the_kernel_is_there(loader):
    loader.kernels["CUDA"] = True
    assert native.load() and reload()
    assert loader.builds == [] and native.has_kernel("vq_nearest", "cuda")
    assert "CUDA kernels" not in native.status(), native.status()


def test_no_cuda_build_under_no_jit(loader, monkeypatch):
    monkeypatch.setenv("FASTDIFF_NO_JIT", "1")
    assert native.load()
    assert loader.builds == []
    assert native.status().endswith("; CUDA kernels: none (the loaded extension has none; FASTDIFF_NO_JIT=1)")


def test_no_cuda_build_without_a_toolkit(loader, monkeypatch, caplog):
    monkeypatch.setattr(native, "_cuda_toolchain_problem", lambda: "no CUDA toolkit found (set CUDA_HOME)")
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert native.load() and reload()
    assert loader.builds == []
    assert "CUDA kernels: no just-in-time CUDA build possible: no CUDA toolkit found" in native.status()
    assert len([r for r in caplog.records if "no CUDA toolkit" in r.getMessage()]) == 1


def test_jit_build_whose_cuda_part_fails_keeps_the_cpu_part(loader, monkeypatch):
    """No fastdiff._C: the JIT build with CUDA fails, the C++-only build loads, the CUDA build is not tried again."""
    def no_prebuilt() -> str:
        raise ImportError("No module named 'fastdiff._C'")

    calls = []

    def jit_build(with_cuda=None):
        calls.append(with_cuda)
        if with_cuda:
            raise RuntimeError("Error building extension: vq_nearest_kernel.cu: nvcc fell over")
        return loader.library

    monkeypatch.setattr(native, "_import_prebuilt", no_prebuilt)
    monkeypatch.setattr(native, "_jit_build", jit_build)
    assert native.load(), native.status()
    assert calls == [True, False] and loader.builds == []
    assert native.status().startswith(f"jit {loader.library} (")
    assert "CUDA kernels: just-in-time build with CUDA failed" in native.status(), native.status()
    assert native.has_kernel("vq_nearest", "cpu") and not native.has_kernel("vq_nearest", "cuda")


@pytest.mark.slow
def test_library_linked_against_the_loaded_extension_uses_it(tmp_path):
    """What the CUDA-only build relies on, with a C++ stand-in: a library linked against the loaded extension's file
    (Python loaded it RTLD_LOCAL) loads and calls its fastdiff::check_vq_inputs. (A second copy of the extension
    would run its operator registrations again, which aborts the process.)"""
    source = tmp_path / "uses_checks.cpp"
    source.write_text(textwrap.dedent("""\
        #include <torch/library.h>
        #include "vq_nearest.h"
        namespace {
        void check(const at::Tensor& z, const at::Tensor& codebook) { fastdiff::check_vq_inputs(z, codebook); }
        }  // namespace
        TORCH_LIBRARY(fastdiff_link_test, m) { m.def("check(Tensor z, Tensor codebook) -> ()", &check); }
        """))
    code = textwrap.dedent(f"""\
        import torch
        from pathlib import Path
        from fastdiff import native
        assert native.load(), native.status()
        native._build_and_load("fastdiff_link_test", "a link test", [Path({str(source)!r})], False,
                               extra_ldflags=[native._library])
        torch.ops.fastdiff_link_test.check(torch.randn(3, 2), torch.randn(4, 2))
        try:
            torch.ops.fastdiff_link_test.check(torch.randn(3, 2), torch.randn(4, 3))
            raise SystemExit("check_vq_inputs did not raise")
        except ValueError as exc:
            assert "D=3" in str(exc), exc
        print("LINKED OK")
        """)
    env = {**os.environ, "FASTDIFF_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(fastdiff.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "LINKED OK" in result.stdout, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_only_extension_gets_its_cuda_kernels_on_a_gpu(tmp_path):
    """End to end where there is a GPU and nvcc, in a fresh process: a C++-only extension loads (as one built
    without nvcc would), the CUDA kernels are built just in time against it, and they find the nearest codes."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (nvcc)")
    code = textwrap.dedent("""\
        import torch
        from fastdiff import native, reference

        def no_prebuilt():
            raise ImportError("simulated: fastdiff._C is not used here")

        cpu_only_build = native._jit_build
        native._import_prebuilt = no_prebuilt
        native._jit_build = lambda with_cuda=None: cpu_only_build(False)  # the C++ part only, as without nvcc
        assert native.load(), native.status()
        assert "cuda=no" in native.status() and "; CUDA kernels: jit " in native.status(), native.status()
        assert native.has_kernel("vq_nearest", "cuda"), native.status()
        g = torch.Generator(device="cuda").manual_seed(0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            z = torch.randn(1000, 64, device="cuda", generator=g).to(dtype)
            codebook = torch.randn(700, 64, device="cuda", generator=g).to(dtype)
            indices, distances = torch.ops.fastdiff.vq_nearest(z, codebook)
            ref_idx, ref_dist = reference.vq_nearest(z.float(), codebook.float())
            assert int((indices != ref_idx).sum()) <= 2, (dtype, int((indices != ref_idx).sum()))
            assert torch.allclose(distances, ref_dist, rtol=1e-4, atol=1e-3), dtype
        print("CUDA OK", native.status())
        """)
    env = {**os.environ, "FASTDIFF_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(fastdiff.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0 and "CUDA OK" in result.stdout, (result.stdout + result.stderr)[-4000:]


# --------------------------------------------------------------------------------------------- ptxas: no spills
KERNEL_SOURCE = native.SOURCE_DIR / "cuda" / "vq_nearest_kernel.cu"
ARCHS = ["sm_80", "sm_90"]
KERNELS = ("codebook_norms_kernel", "vq_search_kernel", "vq_finalize_kernel")  # each for fp32, fp16, bf16
MAX_REGISTERS = 65536 // (256 * 2)  # vq_search_kernel: 256 threads, 2 blocks per multiprocessor -> 128


def find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def parse_ptxas(output: str) -> dict[str, dict[str, int]]:
    """``-Xptxas -v`` output -> {entry function: registers, spill_stores, spill_loads, stack}."""
    props: dict[str, dict[str, int]] = {}
    entries: dict[str, dict[str, int]] = {}
    current = None  # the function the next "Used N registers" line belongs to
    described = None  # the function the next "bytes stack frame" line belongs to
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = m.group(1)
            entries[current] = {}
        elif m := re.search(r"Function properties for (\S+)", line):
            described = m.group(1)
            props.setdefault(described, {})
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)) \
                and described is not None:
            props[described].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                     spill_loads=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
            entries[current]["registers"] = int(m.group(1))
            current = None
    for name, entry in entries.items():
        entry.update(props.get(name, {}))
    return entries


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """One nvcc run per architecture, both at once (a few seconds): arch -> (return code, output)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("ptxas")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DEBUG", raising=False)  # the release flags, as setup.py and the JIT build pass them
        release = native.nvcc_flags()
    flags = ["-std=c++17", f"-I{native.SOURCE_DIR}", *release, *getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])]
    procs = {}
    for arch in ARCHS:
        number = arch.split("_")[1]
        command = [nvcc, "-c", str(KERNEL_SOURCE), "-o", str(out / f"{arch}.o"), *flags,
                   f"-gencode=arch=compute_{number},code={arch}", "-Xptxas", "-v"]
        procs[arch] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {arch: proc.communicate(timeout=300)[0] for arch, proc in procs.items()}
    return {arch: (procs[arch].returncode, outputs[arch]) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_do_not_spill(arch, ptxas_reports):
    returncode, output = ptxas_reports[arch]
    if returncode != 0 and "Unsupported gpu architecture" in output:
        pytest.skip(f"this nvcc cannot compile for {arch}")
    assert returncode == 0, output[-4000:]
    entries = parse_ptxas(output)
    for kernel in KERNELS:  # every instantiation was reported (a parse that finds nothing must not pass)
        assert sum(kernel in name for name in entries) == 3, (kernel, sorted(entries), output[-4000:])
    assert len(entries) == 3 * len(KERNELS), sorted(entries)
    bad = {name: entry for name, entry in entries.items()
           if entry.get("spill_stores") != 0 or entry.get("spill_loads") != 0
           or not 0 < entry.get("registers", 10**9) <= MAX_REGISTERS}
    assert not bad, f"{arch}: spills or more than {MAX_REGISTERS} registers: {bad}"
