#!/usr/bin/env bash
# The GPU check, sized for one device command (10 minutes) on an H200:
#   1. smoke (≤ 1 min, no just-in-time build, no autotuning): one launch of every kernel family against the reference
#      (benchmarks/gpu_smoke.py), so a driver/toolchain/Triton mismatch shows in seconds;
#   2. build the native extension in place (CPU + CUDA), if Python's headers are there (csrc/ops.cpp needs Python.h);
#   3. the CUDA tests; 4. the GPU benchmarks; 5. the ratio table with the roofline columns, printed last.
# Every step has its own time limit, so a slow one cannot eat the next one's time. Installs nothing (needs torch with
# CUDA, triton, pytest, pytest-benchmark, numpy, safetensors, pillow, tqdm; pytest-timeout, diffusers and faiss are
# used when present). Runs from a checkout without installing fastdiff. The JSON and the table go to $OUT when it
# is set (else to ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh            # everything (about 8 minutes)
#   QUICK=1 bash benchmarks/gpu_check.sh    # kernels only: skip the end-to-end pipeline benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-python3}"
status=0
t0=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - t0 )) s]"; }

echo "== device $(elapsed)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== 1. smoke: one launch per kernel family vs the reference $(elapsed)"
FASTDIFF_NO_JIT=1 FASTDIFF_AUTOTUNE=0 timeout 60 $PY benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt" | grep -v "^  File\|^    " || status=1

echo "== 2. build the native extension (CPU + CUDA) in place $(elapsed)"
if $PY -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    start=$(date +%s)
    FASTDIFF_REQUIRE_EXT=1 MAX_JOBS=16 timeout 150 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { echo "build failed or timed out:"; tail -n 30 "$OUT/build.log"; status=1; }
    echo "built in $(( $(date +%s) - start )) s"
else
    echo "no Python.h in this image: not building (the CUDA VQ kernel is then tested only if a build is present)"
fi
FASTDIFF_NO_JIT=1 timeout 30 $PY -m fastdiff info || true  # never a just-in-time build here

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

timeout_flag=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 120)  # the pytest-timeout plugin, if present

echo "== 3. CUDA tests $(elapsed)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests -k "cuda or CUDA" -x "${timeout_flag[@]}" 2>&1 | tail -n 25 \
    || status=1

echo "== 4. benchmarks on CUDA $(elapsed)"
sel=()
[ "${QUICK:-0}" = "1" ] && sel=(--ignore=benchmarks/test_bench_pipeline.py)
timeout 180 $PY -m pytest -q -p no:cacheprovider benchmarks/ "${sel[@]}" --benchmark-json="$OUT/bench.json" \
    --benchmark-min-rounds=5 --benchmark-max-time=0.2 --benchmark-warmup=on 2>&1 | tail -n 8 || status=1

echo "== 5. ratio table (baseline time / fastdiff time; > 1 means fastdiff is faster) $(elapsed)"
$PY benchmarks/report.py "$OUT/bench.json" --md "$OUT/gpu_table.md" --png "$OUT/gpu_ratios.png" > /dev/null || status=1
cat "$OUT/smoke.txt" 2>/dev/null | grep -E "^  (ok|FAIL|skip)"
cat "$OUT/limits.txt" 2>/dev/null
cat "$OUT/gpu_table.md" 2>/dev/null
echo "done $(elapsed), status $status"
exit $status
