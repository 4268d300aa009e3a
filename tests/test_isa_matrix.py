"""Batch invariance and the native kernels on the CPU code paths of ROWS this machine can run, not just its best one.

A CPU runs one of several code paths, chosen at run time: ATen's vector kernels (capped by ATEN_CPU_CAPABILITY),
oneDNN's convolutions (ONEDNN_MAX_CPU_ISA) and fastdiff's native micro-kernels (FASTDIFF_CPU_ISA). The guarantee of
``fastdiff.batch_invariant()`` and ``fastdiff generate`` (same seed → same bytes for any batch size, thread count and
number of processes) must hold on each. ROWS has six of them: every x86 ATen cap (avx512, avx2, default), every
native micro-kernel level (amx with FASTDIFF_CPU_ISA unset, avx512, avx2, generic), and oneDNN's SSE41, AVX2,
AVX512_CORE, AVX512_CORE_VNNI, AVX512_CORE_BF16 and AVX512_CORE_AMX, each with the ATen and native level that goes
with it. oneDNN's AVX, AVX2_VNNI, AVX2_VNNI_2, AVX512_CORE_FP16 and AVX512_CORE_AMX_FP16 levels, and other
combinations of the three caps, are not covered. Each row runs, in fresh subprocesses with those caps set:

1. a check that the caps took effect (ATen's capability, oneDNN's own report of its ISA, the native micro-kernel);
2. the batch-invariance and native-kernel tests (tests/test_batch_invariance.py, test_rows_matmul.py,
   test_vq_nearest.py, and the native GroupNorm+SiLU tests of test_group_norm_silu.py), at 1 and 2 threads;
3. ``fastdiff generate`` of the same 12 images with --batch 1 (1 thread), 5 and 12 (2 threads) and with 2 processes
   under torchrun: all four folders must be byte-identical.

Rows the CPU cannot run are skipped with the reason; the terminal summary lists what was covered. Different rows may
give different bytes (that is what a code path is); whether they did here is reported, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NUM = 12
TIMEOUT = 300  # seconds for one subprocess
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FASTDIFF_CPU_ISA")
X86 = os.uname().machine.lower() in ("x86_64", "amd64")


def _has(flag: str) -> bool:
    cpu = torch.cpu
    return X86 and {
        "amx": lambda: cpu._is_amx_tile_supported(),
        "avx512_bf16": lambda: cpu._is_avx512_bf16_supported(),
        "avx512_vnni": lambda: cpu._is_avx512_supported() and cpu._is_vnni_supported(),
        "avx512": lambda: cpu._is_avx512_supported(),
        "avx2": lambda: cpu._is_avx2_supported(),
        "sse41": lambda: True,
    }[flag]()


# id: (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, FASTDIFF_CPU_ISA, CPU feature needed, what oneDNN's verbose ISA line
# contains, the expected cpu_code_path() entries). Together the rows take every ATen and FASTDIFF_CPU_ISA value once,
# and six of oneDNN's eleven levels (see the module docstring).
ROWS = {
    "amx": ("avx512", "AVX512_CORE_AMX", None, "amx", "AMX", {"aten": "AVX512", "onednn": "AVX512_CORE_AMX",
                                                               "native": "amx"}),
    "avx512_core_bf16": ("avx512", "AVX512_CORE_BF16", "avx512", "avx512_bf16", "bfloat16",
                         {"aten": "AVX512", "onednn": "AVX512_CORE_BF16", "native": "avx512"}),
    "avx512_core_vnni": ("avx512", "AVX512_CORE_VNNI", "avx512", "avx512_vnni", "DL Boost",
                         {"aten": "AVX512", "onednn": "AVX512_CORE_VNNI", "native": "avx512"}),
    "avx512_core": ("avx512", "AVX512_CORE", "avx512", "avx512", "AVX512BW, AVX512VL, and AVX512DQ",
                    {"aten": "AVX512", "onednn": "AVX512_CORE", "native": "avx512"}),
    "avx2": ("avx2", "AVX2", "avx2", "avx2", "AVX2", {"aten": "AVX2", "onednn": "AVX2", "native": "avx2"}),
    "default": ("default", "SSE41", "generic", "sse41", "SSE4.1",
                {"aten": "DEFAULT", "onednn": "SSE41", "native": "generic"}),
}

COVERED: dict[str, str] = {}  # row -> what ran (read by conftest's terminal summary)
SKIPPED: dict[str, str] = {}
_files_by_row: dict[str, dict[str, bytes]] = {}


def _env(row: str, threads: int | None = None) -> dict:
    aten, onednn, fastdiff_isa = ROWS[row][:3]
    env = {k: v for k, v in os.environ.items() if k not in CAP_VARS and k != "OMP_NUM_THREADS"}
    env.update(ATEN_CPU_CAPABILITY=aten, ONEDNN_MAX_CPU_ISA=onednn,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if fastdiff_isa:
        env["FASTDIFF_CPU_ISA"] = fastdiff_isa
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, f"{' '.join(args[:6])}... exited {proc.returncode}:\n{proc.stdout[-3000:]}" \
                                 f"\n{proc.stderr[-3000:]}"
    return proc


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional pixel-diffusion pipeline (self-attention, DDPM: noise drawn at every step)."""
    from fastdiff.schedulers import DDPMScheduler
    from model_factories import save_tiny_pixel_pipeline

    path = tmp_path_factory.mktemp("isa-model")
    save_tiny_pixel_pipeline(path, DDPMScheduler())
    return path


@pytest.mark.parametrize("row", list(ROWS))
def test_code_path(row, model_dir, tmp_path):
    need = ROWS[row][3]
    if not _has(need):
        SKIPPED[row] = f"this CPU has no {need.upper()}"
        pytest.skip(f"ISA row {row}: {SKIPPED[row]}")
    expected, verbose_isa = ROWS[row][5], ROWS[row][4]

    # 1. the caps took effect: fastdiff's view of the path, and oneDNN's own
    probe = _run([sys.executable, __file__, "path"], _env(row))
    path = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {k: path[k] for k in expected} == expected, path
    verbose = _run([sys.executable, "-c", "import torch; torch.nn.functional.conv2d(torch.randn(2, 16, 8, 8), "
                    "torch.randn(16, 16, 3, 3), padding=1)"], {**_env(row), "ONEDNN_VERBOSE": "1"}).stdout
    isa_lines = [line for line in verbose.splitlines() if ",isa:" in line]
    assert isa_lines and verbose_isa in isa_lines[0], isa_lines

    # 2. the batch-invariance and native-kernel tests on this path
    _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_batch_invariance.py",
          "tests/test_rows_matmul.py", "tests/test_vq_nearest.py"], _env(row))
    _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_group_norm_silu.py",
          "-k", "native and as_set"], _env(row))  # the native GroupNorm+SiLU at the row's cap (FASTDIFF_CPU_ISA)
    _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_conv3x3.py",
          "-k", "as_set"], _env(row))  # the Winograd convolution's transforms at the row's cap

    # 3. fastdiff generate: batch 1 / 5 / 12 and 1 / 2 threads in one process, and 2 processes under torchrun
    _run([sys.executable, __file__, "generate", str(model_dir), str(tmp_path)], _env(row))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
          "generate", "--model", str(model_dir), "-n", str(NUM), "--outdir", str(tmp_path / "ranks2"),
          "--batch", "5"], _env(row, threads=1))
    ref = _files(tmp_path / "b1")
    assert sorted(ref) == [f"{i:06d}.png" for i in range(NUM)]
    for name in ("b5", "b12", "ranks2"):
        got = _files(tmp_path / name)
        differ = sorted(k for k in ref if got.get(k) != ref[k])
        assert not differ, f"{row}: {name} differs from batch 1 in {differ}"
    recorded = json.loads((tmp_path / "b1" / "manifest.json").read_text())["cpu_code_path"]
    assert {k: recorded[k] for k in expected} == expected

    _files_by_row[row] = ref
    same_as = [other for other, files in _files_by_row.items() if other != row and files == ref]
    COVERED[row] = (f"ATen {path['aten']}, oneDNN {path['onednn']}, native {path['native']}; files "
                    + (f"same bytes as {', '.join(same_as)}" if same_as else
                       "differ from every other row" if len(_files_by_row) > 1 else "reference"))


def _worker(argv: list[str]) -> None:
    """Run inside a subprocess with the caps set: ``path`` prints cpu_code_path() as JSON; ``generate MODEL OUT``
    makes the 12 images three times (batch 1 at 1 thread, batch 5 and 12 at 2 threads)."""
    from fastdiff.batch_invariance import cpu_code_path

    if argv[0] == "path":
        print(json.dumps(cpu_code_path()))
        return
    from fastdiff.generate import generate

    model, out = Path(argv[1]), Path(argv[2])
    for batch, threads in ((1, 1), (5, 2), (12, 2)):
        torch.set_num_threads(threads)
        generate(model, NUM, out / f"b{batch}", batch=batch, progress=False)


if __name__ == "__main__":
    _worker(sys.argv[1:])
