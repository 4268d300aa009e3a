#!/usr/bin/env bash
# The GPU check, sized for one device command (10 minutes) on an H200:
#   1. smoke (≤ 1 min, no just-in-time build, no autotuning): one launch of every kernel family against the reference
#      (benchmarks/gpu_smoke.py), so a driver/toolchain/Triton mismatch shows in seconds;
#   2. build the native extension in place (CPU + CUDA), if Python's headers are there (csrc/ops.cpp needs Python.h),
#      and check that an error raised inside it reaches Python (else rebuild its C++ with the system compiler);
#   3. the CUDA tests; 4. the GPU benchmarks; 5. the ratio table with the roofline columns, printed last.
# Every step has its own time limit, so a slow one cannot eat the next one's time. Installs nothing (needs torch with
# CUDA, triton, pytest, pytest-benchmark, numpy, safetensors, pillow, tqdm; pytest-timeout, pytest-xdist, diffusers
# and faiss are used when present). Runs from a checkout without installing fastdiff. Output goes to $OUT when it is
# set (else ./gpu_check_out): the tables (gpu_summary.txt, printed last; gpu_table.md in full), the chart, the built
# extension, and gpu_check_logs.tgz (logs, JSONs).
# First run on an H200 (2026-12-04): smoke 10 s, build about 25 s, kernel benchmarks about 150 s.
#
#   bash benchmarks/gpu_check.sh            # everything (about 8 minutes)
#   QUICK=1 bash benchmarks/gpu_check.sh    # kernels only: skip the end-to-end pipeline benchmarks
#   STEPS="smoke build tests" TESTS=all bash benchmarks/gpu_check.sh   # some steps; the whole test suite
#
# Settings (environment):
#   STEPS         steps to run by name: smoke build limits tests bench (default: all)
#   TESTS         cuda (default): the tests that touch CUDA; all: the whole suite
#   TESTS_LIMIT   the tests step's limit in seconds (default 120)
#   TESTS_WORKERS pytest-xdist workers when xdist is there (default 8, two torch threads each)
#   BENCH_FILES   benchmark files by name, e.g. "attention pipeline" (default: all)
#   BENCH_K       a -k expression for the benchmarks, e.g. "not compile"
#   BENCH_LIMIT   the benchmark step's limit in seconds (default 240)
#   SKIP_BUILD=1  use the extension already in fastdiff/ (a call can carry the one an earlier call left in $OUT)
# Tests are listed one per line (-v), so a run cut off by its limit still names what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-python3}"
# wheels carried to a machine that cannot download (the GPU image has no diffusers, which the end-to-end benchmark
# and the parity tests need): put them in .whl/ (see the device notes: pip download --no-deps for Python 3.12) and
# name .whl in the call's carry; they are installed into /tmp/fastdiff-site for this run only
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdiff-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/fastdiff-site" && echo "carried wheels: $(ls .whl)"
fi
STEPS="${STEPS:-smoke build limits tests bench}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
t0=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - t0 )) s]"; }

echo "== device $(elapsed)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
echo "CC=${CC:-} CXX=${CXX:-}; torch built with: $($PY -c "import torch; print(' '.join(l.strip() for l in torch.__config__.show().splitlines() if 'Compiler' in l or 'CXX11_ABI' in l or 'C++ Version' in l))" 2>&1 | cut -c1-200)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if want smoke; then
echo "== 1. smoke: one launch per kernel family vs the reference $(elapsed)"
FASTDIFF_NO_JIT=1 FASTDIFF_AUTOTUNE=0 timeout 60 $PY benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt" | grep -v "^  File\|^    " || status=1
fi

echo "== 2. build the native extension (CPU + CUDA) in place $(elapsed)"
if ! want build || [ "${SKIP_BUILD:-0}" = "1" ]; then
    echo "not building (STEPS/SKIP_BUILD); present: $(ls fastdiff/_C*.so 2>/dev/null || echo none)"
elif $PY -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    start=$(date +%s)
    FASTDIFF_REQUIRE_EXT=1 MAX_JOBS=16 timeout 90 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { echo "build failed or timed out:"; tail -n 30 "$OUT/build.log"; status=1; }
    echo "built in $(( $(date +%s) - start )) s with ${CXX:-c++} ($(${CXX:-c++} --version | head -n 1))"
    # an error raised inside the extension must reach Python as a ValueError. On the GPU image (2026-12-04) the
    # build with its own compiler (CXX=/opt/gcc/bin/g++) crashed there instead (a segfault on a bad call of
    # torch.ops.fastdiff.vq_nearest / rows_matmul): rebuild the C++ part with the system compiler, then check again
    if ! $PY benchmarks/gpu_smoke.py --native-error-path; then
        left=$(( start + 90 - $(date +%s) ))
        if [ -x /usr/bin/g++ ] && [ "$left" -gt 20 ]; then
            echo "rebuilding the C++ part with /usr/bin/g++ ($(/usr/bin/g++ --version | head -n 1))"
            rm -rf build; rm -f fastdiff/_C*.so
            CXX=/usr/bin/g++ FASTDIFF_REQUIRE_EXT=1 MAX_JOBS=16 timeout "$left" $PY setup.py -q build_ext --inplace \
                >> "$OUT/build.log" 2>&1 || { echo "rebuild failed:"; tail -n 20 "$OUT/build.log"; }
            $PY benchmarks/gpu_smoke.py --native-error-path || status=1
        else
            status=1
        fi
    fi
    cp fastdiff/_C*.so "$OUT/" 2>/dev/null || true
else
    echo "no Python.h in this image: not building (the CUDA VQ kernel is then tested only if a build is present)"
fi
FASTDIFF_NO_JIT=1 timeout 30 $PY -m fastdiff info || true  # never a just-in-time build here

if want limits; then
echo "== measured hardware limits (copy bandwidth, matrix rate) $(elapsed)"
timeout 30 $PY - <<'EOF' | tee "$OUT/limits.txt"
import torch, triton.testing as tt
x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
ms = tt.do_bench(lambda: x.clone(), return_mode="median")
print(f"copy bandwidth: {2 * x.numel() / ms / 1e6:.0f} GB/s (roofline.py assumes 4300)")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
ms = tt.do_bench(lambda: a @ a, return_mode="median")
print(f"fp16 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s (roofline.py assumes 790)")
EOF
fi

timeout_flag=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 120)  # the pytest-timeout plugin, if present

if want tests; then
echo "== 3. tests (${TESTS:-cuda}) $(elapsed)"
sel=(-k "cuda or CUDA or gpu or graph")
[ "${TESTS:-cuda}" = "all" ] && sel=(--ignore=tests/test_compile_check.py)  # the AOT check swaps the driver
if $PY -c "import xdist" 2>/dev/null; then sel+=(-n "${TESTS_WORKERS:-8}"); export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"; fi
timeout "${TESTS_LIMIT:-120}" $PY -m pytest -v -p no:cacheprovider -rfE tests "${sel[@]}" "${timeout_flag[@]}" > "$OUT/tests.txt" 2>&1 \
    || status=1
grep -E "(FAILED|ERROR) +tests/|^(FAILED|ERROR) |Fatal Python" "$OUT/tests.txt" | cut -c1-200 | head -n 40
grep -cE "PASSED" "$OUT/tests.txt" | sed 's/^/passed: /'; tail -n 2 "$OUT/tests.txt" | cut -c1-300
fi

if want bench; then
echo "== 4. benchmarks on CUDA $(elapsed)"
# one pytest per benchmark file against a shared deadline, each with its own JSON: a file cut off by the deadline
# (say, by torch.compile's per-shape builds) loses only its own rows
files=(attention group_norm_silu ddim_ddpm_step scheduler_step vq_nearest rows_matmul pipeline)
[ "${QUICK:-0}" = "1" ] && files=(attention group_norm_silu ddim_ddpm_step scheduler_step vq_nearest rows_matmul)
[ -n "${BENCH_FILES:-}" ] && read -ra files <<< "$BENCH_FILES"  # e.g. BENCH_FILES="rows_matmul pipeline"
rm -f "$OUT"/bench_*.json; : > "$OUT/bench.txt"
kargs=(); [ -n "${BENCH_K:-}" ] && kargs=(-k "$BENCH_K")
deadline=$(( $(date +%s) + ${BENCH_LIMIT:-240} ))  # the whole step's limit
for f in "${files[@]}"; do
    left=$(( deadline - $(date +%s) ))
    [ "$left" -lt 10 ] && { echo "no time left for $f" | tee -a "$OUT/bench.txt"; status=1; continue; }
    timeout "$left" $PY -m pytest -q -p no:cacheprovider "benchmarks/test_bench_$f.py" \
        --benchmark-json="$OUT/bench_$f.json" --benchmark-min-rounds=5 --benchmark-max-time=0.2 \
        --benchmark-warmup=on "${kargs[@]}" >> "$OUT/bench.txt" 2>&1 || { echo "$f: failed or cut off"; status=1; }
done
grep -E "^(FAILED|ERROR)" "$OUT/bench.txt" | cut -c1-200 | head -n 20; grep -E "passed|failed" "$OUT/bench.txt"

echo "== 5. ratio table (baseline time / fastdiff time; > 1 means fastdiff is faster) $(elapsed)"
$PY benchmarks/report.py "$OUT"/bench_*.json --md "$OUT/gpu_table.md" --summary "$OUT/gpu_summary.txt" \
    --png "$OUT/gpu_ratios.png" > /dev/null || status=1
fi
cat "$OUT/smoke.txt" 2>/dev/null | grep -E "^  (ok|FAIL|skip)"
cat "$OUT/limits.txt" 2>/dev/null
cat "$OUT/gpu_summary.txt" 2>/dev/null  # the short table; the full one is gpu_table.md
# what comes back from a device call is at most 8 files: the logs and JSONs travel as one archive
(cd "$OUT" && tar czf gpu_check_logs.tgz --remove-files $(ls *.txt *.log bench_*.json 2>/dev/null | grep -v gpu_summary)) \
    || true
echo "done $(elapsed), status $status"
exit $status
