"""Ahead-of-time compile check of every Triton kernel launch fastdiff's host code can make, for sm_90 and sm_80,
without a GPU.

How it works. A stand-in Triton driver names the target GPU (``GPUTarget("cuda", 90 or 80, 32)``) and
:func:`fastdiff.kernels.target.planning_for` tells the host functions they launch on that GPU. The project's own host
functions (``attention``, ``group_norm_silu``, ``ddim_step``, ``ddpm_step``, ``linear_step``) are then called with
CPU tensors of representative shapes; Triton binds and specialises the arguments exactly as for a real launch, and
the check takes each launch at the point where Triton would compile it (``JITFunction._do_compile``), so nothing
runs. The autotuner
is asked as usual: its pruned config list is what the check compiles (its benchmark is replaced by "compile this
config"); attention's heuristic default (FASTDIFF_AUTOTUNE=0) is asked for too. Every distinct launch is then
compiled with ``triton.compile`` for that target, and ptxas's own report gives registers, spills and stack.

It fails (:func:`problems`) on a compile error, shared memory above the arch's per-block limit (227 KiB on sm_90,
163 KiB on sm_80), any spill, and fp16/bf16 (or TF32) attention without tensor-core instructions (``wgmma`` or
``mma.sync``).

Run::

    python -m fastdiff.kernels.compile_check            # the fast subset (what the test suite runs)
    python -m fastdiff.kernels.compile_check --full --write docs/kernels.md

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels). Each compile runs ptxas; the
full sweep takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import pkgutil
import re
import sys
import time
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import autotuner as _autotuner
from triton.runtime import jit as _jit
from triton.runtime.driver import driver as _driver

from fastdiff.kernels import target

# per-block shared-memory limit (bytes) and SM count of the GPU each arch stands for (H200 / A100)
ARCHS = {
    90: {"name": "sm_90 (H200)", "smem_per_block": 227 * 1024, "smem_per_sm": 228 * 1024, "sms": 132},
    80: {"name": "sm_80 (A100)", "smem_per_block": 163 * 1024, "smem_per_sm": 164 * 1024, "sms": 108},
}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass
class Launch:
    """One compile a host function asked for: the kernel, Triton's bound signature and options, and where from."""

    case: str  # the host call that made it, e.g. "attention fp16 D=64 self N=4096"
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options object (num_warps, num_stages, ...)
    target: GPUTarget

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def key(self) -> tuple:
        constexprs = tuple(sorted((str(k), repr(v)) for k, v in self.constexprs.items()))
        attrs = tuple(sorted((str(k), repr(v)) for k, v in self.attrs.items()))
        return (self.kernel, tuple(self.signature.items()), constexprs, attrs, self.options.num_warps,
                self.options.num_stages, self.target.arch)

    def config(self) -> str:
        """The tunable part: block constexprs, warps, stages."""
        blocks = ", ".join(f"{k}={v}" for k, v in self.named_constexprs().items() if k.startswith("BLOCK"))
        return f"{blocks}, warps={self.options.num_warps}, stages={self.options.num_stages}"

    def named_constexprs(self) -> dict:
        names = [p.name for p in self.fn.params]
        out = {}
        for k, v in self.constexprs.items():
            index = k[0] if isinstance(k, tuple) else k
            name = names[index] if isinstance(index, int) and index < len(names) else str(index)
            out[name] = v
        return out


class _StandInDriver:
    """Enough of a CUDA driver for Triton to bind and specialise a launch for ``arch``: no device is touched."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_benchmarker(self):  # never reached: the autotuner's benchmark is replaced while capturing
        raise RuntimeError("compile_check does not benchmark")


def _kernels() -> list:
    """Every JITFunction and Autotuner in the modules of fastdiff.kernels (their per-device caches are reset around a
    capture, so no binder made for the stand-in target outlives it)."""
    import fastdiff.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, (_jit.JITFunction, _autotuner.Autotuner)) and value not in found:
                found.append(value)
    return found


def _reset_caches(kernels) -> None:
    for k in kernels:
        if isinstance(k, _autotuner.Autotuner):
            k.cache.clear()
            k = k.fn
        k.device_caches.clear()


@contextlib.contextmanager
def capturing(arch: int) -> Iterator[list[Launch]]:
    """Within this block, every Triton launch of fastdiff's host functions is recorded for ``arch`` instead of run."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if target.INTERPRET:
        raise RuntimeError("compile_check needs compiled Triton: run it without TRITON_INTERPRET=1")
    launches = _Launches()
    launches.case = {"name": ""}  # the case being captured; capture() sets its name

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.append(Launch(launches.case["name"], self, dict(signature), dict(constexprs), dict(attrs), options,
                               self.device_caches[device][2]))
        return None  # "not compiled": the launch returns without running

    def bench(self, *args, config, **meta):
        self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [0.0, 0.0, 0.0]

    kernels = _kernels()
    saved_driver = _driver._active
    saved = (_jit.JITFunction._do_compile, _autotuner.Autotuner._bench)
    _reset_caches(kernels)
    _driver.set_active(_StandInDriver(arch))
    _jit.JITFunction._do_compile, _autotuner.Autotuner._bench = do_compile, bench
    try:
        with target.planning_for(arch, ARCHS[arch]["sms"]):
            yield launches
    finally:
        _jit.JITFunction._do_compile, _autotuner.Autotuner._bench = saved
        _driver._active = saved_driver
        _reset_caches(kernels)


class _Launches(list):
    """The launches captured so far, and the name of the case being captured (``case["name"]``)."""

    case: dict


# ----------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # attention, group_norm_silu, ddim_step, ddpm_step, linear_step
    dtype: str
    run: Callable[[], None]  # calls the host function(s)


def _attention_cases(dtypes, head_dims, shapes, misaligned: bool) -> list[Case]:
    from fastdiff.kernels import attention as attn

    def run(dtype, d, n, m, offset):
        def go():
            def make(rows):
                base = torch.empty(1, 2, rows, d + (1 if offset else 0), dtype=DTYPES[dtype])
                return base[..., 1:] if offset else base

            q, k, v = make(n), make(m), make(m)
            precision = torch.get_float32_matmul_precision()
            autotune = attn._AUTOTUNE
            try:
                # "tf32": fp32 with TF32 allowed (the tensor-core kernel); "fp32": exact (the CUDA-core kernel)
                torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
                attn.attention(q, k, v, d ** -0.5)  # the autotuner's pruned list
                attn._AUTOTUNE = False
                attn.attention(q, k, v, d ** -0.5)  # the heuristic default
            finally:
                attn._AUTOTUNE = autotune
                torch.set_float32_matmul_precision(precision)
        return go

    cases = []
    for dtype in dtypes:
        for d in head_dims:
            for label, n, m in shapes:
                cases.append(Case(f"attention {dtype} D={d} {label}", "attention", dtype, run(dtype, d, n, m, False)))
            if misaligned:
                cases.append(Case(f"attention {dtype} D={d} misaligned q/k/v (offset view)", "attention", dtype,
                                  run(dtype, d, 1024, 1024, True)))
    return cases


def _group_norm_cases(dtypes, shapes) -> list[Case]:
    from fastdiff.kernels import group_norm_silu as gn

    def run(dtype, shape, channels_last, silu):
        def go():
            x = torch.empty(shape, dtype=DTYPES[dtype])
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w = torch.empty(shape[1], dtype=DTYPES[dtype])
            gn.group_norm_silu(x, 32, w, w, 1e-5, "silu" if silu else None)
        return go

    cases = []
    for dtype in dtypes:
        for shape in shapes:
            for channels_last in (False, True):
                layout = "channels_last" if channels_last else "NCHW"
                cases.append(Case(f"group_norm_silu {dtype} {tuple(shape)} {layout}", "group_norm_silu", dtype,
                                  run(dtype, shape, channels_last, True)))
            cases.append(Case(f"group_norm {dtype} {tuple(shape)} NCHW", "group_norm_silu", dtype,
                              run(dtype, shape, False, False)))
    return cases


def _step_cases(dtypes, full: bool) -> list[Case]:
    from fastdiff.kernels import ddim_step, ddpm_step

    def run(op, dtype, prediction, guided, noisy, clip, per_sample, extra):
        def go():
            b = 2
            x = torch.empty(b, 4, 64, 64, dtype=DTYPES[dtype])
            mo = torch.empty(2 * b if guided else b, 4, 64, 64, dtype=DTYPES[dtype])
            noise = torch.empty_like(x) if noisy else None
            a_t = torch.full((b,), 0.5) if per_sample else 0.5
            kwargs = {"prediction_type": prediction, "clip_sample_range": 1.0 if clip else None,
                      "guidance_scale": 7.5 if guided else None, **extra}
            if op == "ddim":
                ddim_step.ddim_step(x, mo, a_t, 0.6, noise=noise, eta=1.0 if noisy else 0.0, **kwargs)
            else:
                ddpm_step.ddpm_step(x, mo, a_t, 0.6, noise=noise, **kwargs)
        return go

    cases = []
    predictions = ("epsilon", "sample", "v_prediction") if full else ("epsilon", "v_prediction")
    for dtype in dtypes:
        for op in ("ddim", "ddpm"):
            extras = [{}] if op == "ddim" else [{"variance_type": v} for v in
                                                (("fixed_small", "fixed_large") if full else ("fixed_small",))]
            for prediction in predictions:
                for guided in (False, True):
                    for noisy in (False, True):
                        for clip in ((False, True) if full else (guided,)):
                            for per_sample in ((False, True) if full else (noisy,)):
                                for extra in extras:
                                    name = (f"{op}_step {dtype} {prediction} guided={guided} noise={noisy} "
                                            f"clip={clip} per_sample_alpha={per_sample} {extra or ''}").strip()
                                    cases.append(Case(name, f"{op}_step", dtype,
                                                      run(op, dtype, prediction, guided, noisy, clip, per_sample,
                                                          extra)))
    return cases


def _linear_step_cases(dtypes, full: bool) -> list[Case]:
    """The sampler update as linear combinations: input counts 0 … 6 and 1 … 3 outputs (the schedulers use
    0–5 inputs and 2–3 outputs), with and without guidance and the x0 clamp."""
    from fastdiff.kernels import linear_step

    def run(dtype, n_inputs, n_outputs, guided, clip):
        def go():
            b = 2
            x = torch.empty(b, 4, 64, 64, dtype=DTYPES[dtype])
            mo = torch.empty(2 * b if guided else b, 4, 64, 64, dtype=DTYPES[dtype])
            inputs = [torch.empty(b, 4, 64, 64, dtype=torch.float32) for _ in range(n_inputs)]
            rows = [[0.5] * (2 + n_inputs + j) for j in range(n_outputs)]
            linear_step.linear_step(x, mo, inputs, rows, 7.5 if guided else None, 1.0 if clip else None)
        return go

    combos = ([(i, o, g, c) for i in range(7) for o in (1, 2, 3) for g in (False, True) for c in (False, True)]
              if full else [(0, 2, False, False), (3, 2, True, False), (6, 3, True, True)])
    return [Case(f"linear_step {dtype} inputs={i} outputs={o} guided={g} clip={c}", "linear_step", dtype,
                 run(dtype, i, o, g, c)) for dtype in dtypes for i, o, g, c in combos]


FAMILIES = ("attention", "group_norm_silu", "ddim_step", "ddpm_step", "linear_step")
SELF_SHAPES = [("self N=1024", 1024, 1024), ("self N=4096", 4096, 4096)]
CROSS_SHAPES = [("cross N=4096 M=77", 4096, 77), ("cross N=4096 M=1", 4096, 1)]
GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8), (2, 320, 8, 8)]


def cases(full: bool, families=None) -> list[Case]:
    """The host calls to capture (only those of ``families`` when given). The fast subset keeps one shape per code
    path the launchers distinguish."""
    if families:
        return [c for c in cases(full) if c.family in families]
    if full:
        return (_attention_cases(("fp32", "tf32", "fp16", "bf16"), (16, 40, 64, 80, 128, 160),
                                 SELF_SHAPES + CROSS_SHAPES, misaligned=True)
                + _group_norm_cases(("fp32", "fp16", "bf16"), GN_SHAPES)
                + _step_cases(("fp32", "fp16", "bf16"), full=True)
                + _linear_step_cases(("fp32", "fp16", "bf16"), full=True))
    return (_attention_cases(("fp16",), (64,), SELF_SHAPES[1:2] + CROSS_SHAPES[:1], misaligned=False)
            + _attention_cases(("fp32",), (40, 160), SELF_SHAPES[:1], misaligned=False)
            + _attention_cases(("tf32",), (64, 128), CROSS_SHAPES[:1], misaligned=False)
            + _attention_cases(("bf16",), (160,), CROSS_SHAPES[:1], misaligned=True)
            + _group_norm_cases(("fp16",), [GN_SHAPES[0], GN_SHAPES[4]])
            + _fast_steps()
            + _linear_step_cases(("fp16",), full=False))


def _fast_steps() -> list[Case]:
    """Per step op, the plainest variant and the one with every option on (guidance, noise, clip, per-sample ᾱ)."""
    steps = _step_cases(("fp16",), full=False)
    out = []
    for op in ("ddim_step", "ddpm_step"):
        mine = [c for c in steps if c.family == op]
        out += [mine[0], mine[-1]]
    return out


def capture(case_list: list[Case], archs=(90, 80)) -> list[Launch]:
    """Every distinct launch the host functions make for these cases, per arch."""
    seen, out = set(), []
    for arch in archs:
        with capturing(arch) as launches:
            for case in case_list:
                launches.case["name"] = case.name
                case.run()
        for launch in launches:
            if launch.key() not in seen:
                seen.add(launch.key())
                out.append(launch)
    return out


# ----------------------------------------------------------------------------------------------- compile
@dataclasses.dataclass
class Result:
    launch: Launch
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None  # bytes per block
    tensor_cores: str = ""  # "wgmma", "mma.sync" or ""
    seconds: float = 0.0

    @property
    def arch(self) -> int:
        return self.launch.target.arch

    def to_row(self) -> dict:
        """The result as a JSON-able dict (what ``--json`` writes and ``--report-from`` reads)."""
        return {"kernel": self.launch.kernel, "case": self.launch.case, "arch": self.arch,
                "dtype": _dot_dtype(self.launch), "config": self.launch.config(), "error": self.error,
                "registers": self.registers, "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                "stack": self.stack, "shared": self.shared, "ctas_per_sm": self.ctas_per_sm(),
                "tensor_cores": self.tensor_cores, "seconds": round(self.seconds, 2)}

    def ctas_per_sm(self) -> int | None:
        """Estimated resident blocks per SM from registers, shared memory, warps (occupancy calculator's rules)."""
        if self.registers is None:
            return None
        warps = self.launch.options.num_warps
        regs_per_warp = ((max(self.registers, 1) * 32 + 255) // 256) * 256  # allocated per warp in units of 256
        by_regs = REGS_PER_SM // (regs_per_warp * warps)
        by_smem = ARCHS[self.arch]["smem_per_sm"] // (self.shared + 1024) if self.shared else MAX_CTAS_PER_SM
        return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch) -> Result:
    """Compile one launch with Triton for its target; ptxas's verbose report gives registers, spills and stack."""
    from triton import knobs
    from triton.compiler import ASTSource

    result = Result(launch)
    start = time.perf_counter()
    log = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # a cached compile has no report
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=launch.target, options=launch.options.__dict__)
    except Exception as e:  # noqa: BLE001 - any compiler failure is this launch's result
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        return result
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        result.seconds = time.perf_counter() - start
    report = log.getvalue()
    usage, spill = _PTXAS_USAGE.search(report), _PTXAS_SPILL.search(report)
    if usage is None or spill is None:
        result.error = f"no ptxas report in the compile log: {report[-300:]!r}"
        return result
    result.registers = int(usage.group(1))
    result.stack, result.spill_stores, result.spill_loads = (int(g) for g in spill.groups())
    result.shared = int(kernel.metadata.shared)
    ptx = kernel.asm.get("ptx", "")
    result.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    return result


def problems(results: list[Result]) -> list[str]:
    """Every way a result breaks the rules: compile error, shared memory over the block limit, any spill,
    fp16/bf16/TF32 attention without tensor cores."""
    return row_problems([r.to_row() for r in results])


def row_problems(rows: list[dict]) -> list[str]:
    """:func:`problems` of results in their JSON form."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} [{r['config']}] ({r['case']})"
        if r["error"]:
            out.append(f"{where}: compile error: {r['error']}")
            continue
        if r["shared"] > ARCHS[r["arch"]]["smem_per_block"]:
            out.append(f"{where}: {r['shared']} B shared memory > the {ARCHS[r['arch']]['smem_per_block']} B block "
                       "limit")
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                       f"({r['registers']} registers, {r['stack']} B stack)")
        if r["kernel"].startswith("_attention") and r["dtype"] in ("fp16", "bf16", "tf32") and not r["tensor_cores"]:
            out.append(f"{where}: no tensor-core instruction (wgmma / mma.sync) in fp16/bf16/TF32 attention")
    return out


def _dot_dtype(launch: Launch) -> str:
    """The first pointer's element type ("fp16", ...), or "tf32" for fp32 attention on TF32 tensor cores."""
    if launch.named_constexprs().get("DOT_PRECISION") == "tf32":
        return "tf32"
    ty = next(iter(launch.signature.values()))  # Q's pointer type, e.g. "*fp16"
    return ty.lstrip("*")


def run_check(full: bool, archs=(90, 80), progress: Callable[[str], None] | None = None,
              families=None) -> list[Result]:
    launches = capture(cases(full, families), archs)
    results = []
    for i, launch in enumerate(launches):
        results.append(compile_launch(launch))
        if progress:
            r = results[-1]
            progress(f"[{i + 1}/{len(launches)}] {launch.kernel} sm_{r.arch} {launch.config()} {_dot_dtype(launch)}: "
                     + (f"ERROR {r.error}" if r.error else
                        f"{r.registers} regs, {r.spill_stores} B spill, {r.shared} B smem, {r.seconds:.1f} s"))
    return results


# ----------------------------------------------------------------------------------------------- report
def markdown(rows: list[dict], command: str, triton_version: str) -> str:
    """The report: a summary per kernel, arch and dtype, then every distinct compile result (launches that compile
    to the same registers, spills, stack, shared memory and MMA under one config are one row, with their count and
    the first case that made them), then the problems."""
    lines = [
        "# Triton kernels: what the compiler makes of them",
        "",
        f"Written by `{command}` (triton {triton_version}): every launch fastdiff's host code can make for the",
        "representative shapes in `fastdiff/kernels/compile_check.py` (attention D 16–160, self N 1024/4096, cross",
        "M = 77 and M = 1, offset views; GroupNorm C 320–2560, NCHW and channels_last; every DDIM/DDPM step variant;",
        "the sampler update linear_step with 0–6 inputs and 1–3 outputs; fp32, TF32, fp16, bf16), compiled for sm_90 (H200) and sm_80 (A100) without a GPU. Registers, spills and",
        "stack from ptxas; shared memory per block from Triton; CTAs per SM estimated from registers (65,536 per SM),",
        "shared memory (228 / 164 KiB per SM) and warps (64 per SM); tensor cores: the MMA instruction in the PTX.",
        "",
        "## Summary",
        "",
        "| kernel | arch | dtype | launches | configs | registers | max spill (B) | max shared (KiB) | CTAs/SM | "
        "tensor cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], -r["arch"], r["dtype"]), []).append(r)
    for (kernel, neg_arch, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if not r["error"]]
        regs = sorted(r["registers"] for r in ok)
        cores = ", ".join(sorted({r["tensor_cores"] for r in ok if r["tensor_cores"]})) or "-"
        lines.append(f"| {kernel} | sm_{-neg_arch} | {dtype} | {len(rs)} | {len({r['config'] for r in rs})} | "
                     + (f"{regs[0]}–{regs[-1]} | {max(r['spill_stores'] for r in ok)} | "
                        f"{max(r['shared'] for r in ok) / 1024:.1f} | {min(r['ctas_per_sm'] for r in ok)}–"
                        f"{max(r['ctas_per_sm'] for r in ok)} | {cores} |" if ok else "errors only | | | | |"))
    by_kernel: dict[str, dict[tuple, list[dict]]] = {}
    for r in rows:
        key = (-r["arch"], r["dtype"], r["config"], r["error"], r["registers"], r["spill_stores"], r["stack"],
               r["shared"], r["tensor_cores"])
        by_kernel.setdefault(r["kernel"], {}).setdefault(key, []).append(r)
    for kernel in sorted(by_kernel):
        lines += ["", f"## {kernel}", "",
                  "| arch | dtype | config | registers | spill (B) | stack (B) | shared (KiB) | CTAs/SM | tensor cores "
                  "| launches | first case |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, rs in sorted(by_kernel[kernel].items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            r = rs[0]
            if r["error"]:
                lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['config']} | error: {r['error']} | | | | | | "
                             f"{len(rs)} | {r['case']} |")
                continue
            lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['config']} | {r['registers']} | {r['spill_stores']} | "
                         f"{r['stack']} | {r['shared'] / 1024:.1f} | {r['ctas_per_sm']} | {r['tensor_cores'] or '-'} | "
                         f"{len(rs)} | {r['case']} |")
    found = row_problems(rows)
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in found] if found else ["None."]) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every dtype, head dim, shape and step variant")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="default: 90 and 80")
    parser.add_argument("--write", metavar="PATH", help="write the markdown report here (e.g. docs/kernels.md)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these kernel families")
    parser.add_argument("--report-from", metavar="JSON", help="no compiling: report an earlier --json output")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else (90, 80)
    version = triton.__version__
    if args.report_from:  # no compiling: the report of an earlier run's JSON
        with open(args.report_from) as f:
            saved = json.load(f)
        rows, version, args.full = saved["results"], saved["triton"], saved.get("full", False)
    else:
        progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        rows = [r.to_row() for r in run_check(args.full, archs, progress, args.family)]
    if args.write:
        from fastdiff.files import write_text_atomic

        command = f"python -m fastdiff.kernels.compile_check{' --full' if args.full else ''} --write {args.write}"
        write_text_atomic(args.write, markdown(rows, command, version))
    if args.json:
        from fastdiff.files import write_json_atomic

        write_json_atomic(args.json, {"triton": version, "full": args.full, "results": rows})
    found = row_problems(rows)
    arch_names = ", ".join(f"sm_{a}" for a in sorted({r["arch"] for r in rows}, reverse=True))
    print(f"{len(rows)} compiles ({arch_names}), {len(found)} problems")
    for p in found:
        print(f"  {p}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
