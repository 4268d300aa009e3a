#!/usr/bin/env bash
# The GPU machine's Triton (3.6, with its own ptxas) beside this machine's (3.9), in a separate venv: the Triton
# kernel tests through 3.6's interpreter and the fast AOT compile check with 3.6's compiler. Version differences are
# handled in the kernels (kernels/__init__.py, the launch register budgets), never by pinning; this keeps it so.
# Runs from the checkout (PYTHONPATH), using the native extension the main install built in place.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .ci-venv-triton36
. .ci-venv-triton36/bin/activate
pip install -q -U setuptools wheel torch==2.13.0
pip install -q triton==3.6.0 numpy pytest safetensors pillow tqdm  # fastdiff's runtime dependencies
python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__; print('triton', triton.__version__)"
PYTHONPATH="$PWD" python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_group_norm_silu.py \
    tests/test_ddim_step.py tests/test_ddpm_step.py tests/test_linear_step.py tests/test_schedulers_fused.py \
    tests/test_triton_versions.py tests/test_gpu_paths.py \
    tests/test_compile_check.py tests/test_interpreter_bounds.py tests/test_compile_traced.py
deactivate
