"""The first step of ``benchmarks/gpu_check.sh``: one launch of every kernel family on the GPU against the PyTorch
reference, so a driver, toolchain or Triton-version mismatch shows in seconds, before any build or benchmark.

    python benchmarks/gpu_smoke.py        # prints one line per launch; exit 1 if any failed or disagreed
    python benchmarks/gpu_smoke.py --native-error-path   # only: a bad native call raises ValueError, no crash

Also runs here without a GPU when TRITON_INTERPRET=1 (the interpreter, CPU tensors), which is how its test checks
it. The native VQ kernel is skipped (reported) when the extension is not built yet: the build comes after this step.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

import fastdiff
from fastdiff import native, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cases():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v = randn(2, 4, 300, 64, dtype=dtype), randn(2, 4, 77, 64, dtype=dtype), randn(2, 4, 77, 64, dtype=dtype)
        yield f"attention {dtype} cross M=77 D=64", dtype, lambda q=q, k=k, v=v, b=None: ops.attention(
            q, k, v, backend=b)
    for layout in ("NCHW", "channels_last"):
        x = randn(2, 320, 32, 32)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        w, bias = randn(320), randn(320)
        yield f"group_norm_silu fp16 {layout}", torch.float16, lambda x=x, w=w, bias=bias, b=None: ops.group_norm_silu(
            x, 32, w, bias, backend=b)
    x, m, z = randn(2, 4, 32, 32), randn(4, 4, 32, 32), randn(2, 4, 32, 32)
    yield "ddim_step fp16 η=1 + CFG", torch.float16, lambda b=None: ops.ddim_step(
        x, m, 0.5, 0.7, eta=1.0, noise=z, guidance_scale=5.0, backend=b)[0]
    yield "ddpm_step fp16 per-sample ᾱ", torch.float16, lambda b=None: ops.ddpm_step(
        x, m[:2], torch.tensor([0.5, 0.4], device=DEVICE), torch.tensor([0.6, 0.5], device=DEVICE), noise=z,
        backend=b)[0]
    h = [randn(2, 4, 32, 32, dtype=torch.float32) for _ in range(3)]
    yield "linear_step fp16 3 inputs 3 outputs + CFG + clip", torch.float16, lambda b=None: ops.linear_step(
        x, m, h, coefficients=[[0.5, -1.0, 0.0, 0.1, 0.0], [1.0, 0.0, 0.2, 0.0, -0.3, 0.7],
                               [0.0, 0.0, 0.0, 0.0, 0.4, 0.6, 0.5]], guidance_scale=5.0, clip_sample_range=1.0,
        backend=b)[2]
    zq, codebook = randn(1000, 64, dtype=torch.float32), randn(512, 64, dtype=torch.float32)
    yield "vq_nearest fp32 (native)", None, lambda b=None: ops.vq_nearest(zq, codebook, backend=b or "native")


_ERROR_PROBE = """
import faulthandler, torch
faulthandler.enable()
from fastdiff import native
assert native.load(), native.status()
try:
    torch.ops.fastdiff.vq_nearest(torch.randn(4, 3), torch.randn(5, 4))
except ValueError as exc:
    print("ValueError:", str(exc).splitlines()[0])
else:
    raise SystemExit("no error raised")
"""


def native_error_path() -> tuple[bool | None, str]:
    """A bad call of the native op must come back as a Python ValueError. Run in a child process: an extension
    built against another C++ runtime than torch's can crash while throwing (seen as a segfault), which must not
    take the smoke run down with it. (None, why) when the extension is not loaded."""
    import subprocess

    if not native.load():
        return None, native.status()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _ERROR_PROBE], capture_output=True, text=True, timeout=60, env=env)
    if proc.returncode == 0 and "ValueError" in proc.stdout:
        return True, proc.stdout.strip()
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return False, f"exit code {proc.returncode}: " + " | ".join(tail)


def main() -> int:
    kernel_backend = "triton" if DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    failed = 0
    print(f"smoke: {DEVICE} ({torch.cuda.get_device_name(0) if DEVICE.type == 'cuda' else 'no GPU'}), "
          f"torch {torch.__version__}")
    for name, dtype, run in _cases():
        start = time.perf_counter()
        if name.startswith("vq_nearest") and not native.has_kernel("vq_nearest", DEVICE.type):
            print(f"  skip  {name}: the native extension has no {DEVICE.type} kernel yet (built in the next step)")
            continue
        try:
            fastdiff.reset_counts()
            got = run(b=None if name.startswith("vq_nearest") else kernel_backend)
            paths = {path for _, path in fastdiff.counts()}
            if not paths & {"triton", "interpreter", "native"}:
                raise RuntimeError(f"the kernel did not run (paths taken: {sorted(paths)})")
            want = run(b="torch")
            if dtype is None:  # indices: the same nearest row, ties aside
                ok = (got.cpu() == want.cpu()).float().mean().item() >= 0.999
                detail = "indices agree" if ok else "indices disagree"
            else:
                err = _rel(got, want)
                ok = err <= TOL[dtype]
                detail = f"relative error {err:.1e} (tolerance {TOL[dtype]:.0e})"
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the next family still runs
            ok, detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(limit=3)
        failed += not ok
        print(f"  {'ok   ' if ok else 'FAIL '} {name}: {detail} ({time.perf_counter() - start:.1f} s)", flush=True)
    ok, detail = native_error_path()
    if ok is not None:
        failed += not ok
        print(f"  {'ok   ' if ok else 'FAIL '} native error path: {detail}", flush=True)
    print(f"smoke: {'all ok' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--native-error-path"]:  # only that check (gpu_check.sh runs it right after the build)
        ok, detail = native_error_path()
        print(f"  {'ok   ' if ok else 'FAIL '} native error path: {detail}")
        sys.exit(0 if ok else 1)
    sys.exit(main())
