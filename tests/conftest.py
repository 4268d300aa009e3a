"""Test setup. Triton's interpreter must be switched on before any kernel module is imported, so it is set here.

By default the suite runs the reference path (FASTDIFF_BACKEND=torch) so model and sampler tests stay fast on a
CPU; kernel tests force the Triton kernels with ``backend="triton"`` (the interpreter on CPU, compiled on CUDA),
and the whole-model tests switch FASTDIFF_BACKEND back to "auto" themselves.
"""

import os
import sys

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU machine the kernels are compiled, never interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTDIFF_BACKEND", "torch")
# every interpreted launch must stay inside its tensors (tests/interpreter_bounds.py; FASTDIFF_TEST_BOUNDS=0: off)
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FASTDIFF_TEST_BOUNDS", "1") != "0":
    import interpreter_bounds

    interpreter_bounds.install()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run the test body on the CPU (the interpreter / native CPU code) and on CUDA when present."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by default only without CUDA)")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny models gain nothing from threads, and on a shared 2-core CPU
    oversubscribed threads make them 10–30× slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _planned_gpu(monkeypatch):
    """FASTDIFF_TEST_PLAN_GPU=90 (or 80): interpreted launches are sized as the host code sizes them for that GPU
    (block sizes, the heuristic attention configs, split decisions for its SM count), so the interpreter and its bounds
    checker see the GPU's launch shapes. Off by default (.ci/run runs the kernel tests so once per arch)."""
    arch = os.environ.get("FASTDIFF_TEST_PLAN_GPU")
    if not arch or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from fastdiff.kernels import attention, compile_check, target

    monkeypatch.setattr(attention, "_AUTOTUNE", False)  # no GPU to benchmark configs on: the heuristic default
    with target.planning_for(int(arch), compile_check.ARCHS[int(arch)]["sms"]):
        yield


@pytest.fixture(autouse=True)
def _cuda_context_health(request):
    """On a GPU: after each test, wait for its kernels and check the CUDA context survived. An illegal or
    misaligned address (or a device-side assert) is sticky: every later CUDA call in the process fails, so one bad
    launch would show as hundreds of failures in unrelated tests. Here it fails the test that caused it; under
    pytest-xdist the worker then exits, and xdist names that test and goes on in a fresh worker."""
    yield
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        message = f"CUDA context lost after {request.node.nodeid}: {exc}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(3)
        pytest.fail(message, pytrace=False)


def pytest_terminal_summary(terminalreporter):
    """List the CPU code paths tests/test_isa_matrix.py covered and skipped (when it ran)."""
    matrix = sys.modules.get("test_isa_matrix") or sys.modules.get("tests.test_isa_matrix")
    if matrix is None or not (matrix.COVERED or matrix.SKIPPED):
        return
    terminalreporter.section("CPU code paths (tests/test_isa_matrix.py)")
    for row, what in matrix.COVERED.items():
        terminalreporter.write_line(f"covered {row}: {what}")
    for row, why in matrix.SKIPPED.items():
        terminalreporter.write_line(f"skipped {row}: {why}")
