"""benchmarks/gpu_smoke.py (the first step of gpu_check.sh) through Triton's interpreter, and gpu_check.sh's time
budget: the sum of its steps' limits fits one device command (600 s) with room for start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_runs_every_kernel_family_against_the_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    env.pop("FASTDIFF_BACKEND", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ok")]
    families = {line.split()[1] for line in lines}
    assert families >= {"attention", "group_norm_silu", "ddim_step", "ddpm_step"}, proc.stdout
    assert "smoke: all ok" in proc.stdout


def test_gpu_check_fits_one_device_command():
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    limits = [int(n) for n in re.findall(r"\btimeout (?:\"\$\{[A-Z_]+:-)?(\d+)\}?\"? ", script)]
    limits += [int(n) for n in re.findall(r"deadline=\$\(\( \$\(date \+%s\) \+ \$\{BENCH_LIMIT:-(\d+)\} \)\)", script)]
    assert len(limits) == 6, limits  # smoke, build, info, limits, tests, benchmarks: every step is bounded
    assert sum(limits) <= 570, limits
    assert "gpu_smoke.py" in script.split("build_ext")[0]  # the smoke step comes first
    assert "Python.h" in script and "pytest_timeout" in script
