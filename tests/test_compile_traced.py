"""torch.compile sees inside fastdiff's Triton ops (fastdiff/ops.py, "torch.compile" section).

On CUDA tensors on the Triton path, functionalization turns each public op node into a ``torch.library.triton_op``
whose body is the kernels' host function with its launches wrapped by ``wrap_triton``: the graph inductor gets holds
the Triton kernels themselves, not an opaque call. Checked here without a GPU by tracing on fake CUDA tensors
(tests/traced_ops_probe.py, a child process: the tests run under the interpreter, the trace needs compiled Triton).
On the reference path the op becomes the reference's PyTorch code; under the interpreter it stays one opaque op.
The inductor-compiled run on a GPU is in tests/test_gpu_paths.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import ops
from tests.utils import assert_rel_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")

EXPECTED = {  # case → the kernels its graph must launch, in order
    "group_norm_silu single pass": ["_group_norm_silu_kernel"],
    "group_norm_silu NCHW": ["_group_norm_stats_kernel", "_group_norm_silu_apply_kernel"],
    "group_norm_silu channels_last, split": ["_group_norm_stats_kernel", "_group_norm_silu_apply_kernel"],
    "attention fp16 cross": ["_attention_kernel"],
    "attention fp32 D=160 (sliced)": ["_attention_fp32_kernel"],
    "ddim_step float alphas + CFG": ["_ddim_step_kernel"],
    "ddpm_step tensor alphas": ["_ddpm_step_kernel"],
    "linear_step 2 inputs 2 outputs + CFG": ["_linear_step_kernel"],
    "block: group_norm_silu → attention": ["_group_norm_stats_kernel", "_group_norm_silu_apply_kernel",
                                           "_attention_kernel"],
}
WRITTEN = {"Y", "WS", "O", "PREV", "X0", "O0", "O1", "O2"}  # the kernels' output arguments (everything else is only read)


def _child(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a child process without the interpreter (compiled Triton), fastdiff from this checkout."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, *args], env=child_env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def traced():
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch without torch.library.triton_op")
    proc = _child(os.path.join(ROOT, "tests", "traced_ops_probe.py"), TRITON_DEFAULT_FP_FUSION="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["case"]: row for row in rows}


def test_every_case_was_traced(traced):
    assert set(traced) == set(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_the_graph_launches_the_triton_kernels(traced, case):
    row = traced[case]
    assert row["opaque"] == [], f"fastdiff ops left opaque in the graph: {row['opaque']}"
    assert row["kernels"] == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_only_outputs_are_written(traced, case):
    """torch analysed each kernel's TTIR: only its output arguments are cloned for functionalization, so inductor
    neither copies the inputs nor orders reads around false writes."""
    for kernel, clones in zip(traced[case]["kernels"], traced[case]["clones"]):
        assert clones and set(clones) <= WRITTEN, f"{kernel} clones {clones}"


def test_the_interpreter_path_keeps_the_opaque_op(monkeypatch):
    """CPU tensors under Triton's interpreter: the compiled graph calls the public op (one node per op, the
    interpreter runs inside it), which still matches eager."""
    from torch._dynamo.backends.common import aot_autograd

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def block(x, q, k):
        return ops.attention(q, k, k), ops.group_norm_silu(x, 4, None, None)

    args = (torch.randn(2, 8, 4, 4), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 7, 32))
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(*args)
    for got, want in zip(compiled, block(*args)):
        assert_rel_close(got, want, 1e-6, "compiled vs eager")
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"fastdiff.attention.default", "fastdiff.group_norm_silu.default"} <= targets, targets
    assert not any("triton_kernel_wrapper" in t for t in targets), targets


def test_triton_ops_are_registered():
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch without torch.library.triton_op")
    for name in ("group_norm_silu", "attention", "ddim_step", "ddpm_step", "linear_step"):
        assert name in ops.triton_ops()
        assert hasattr(torch.ops.fastdiff, f"{name}_triton"), name


def test_reference_path_is_traced_into_plain_pytorch(monkeypatch):
    """On the reference path (FASTDIFF_BACKEND=torch here; plain CPU tensors without the interpreter in real use)
    the compiled graph holds the reference's PyTorch ops, not a fastdiff op, so inductor can fuse them (GroupNorm
    with its SiLU, the step's arithmetic) with the code around them; the result matches eager, every op and both
    alpha kinds included."""
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def block(x, q, k, s, e, a):
        h = ops.group_norm_silu(x, 4, None, None)
        att = ops.attention(q, k, k)
        prev, x0 = ops.ddim_step(s, e, 0.4, 0.7, guidance_scale=2.0, eta=0.5, noise=s)
        prev2, _ = ops.ddpm_step(s, e[:2], a, a + 0.2, noise=s)
        return h, att, prev, x0, prev2

    args = (torch.randn(2, 8, 4, 4), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 7, 32), torch.randn(2, 3, 4, 4),
            torch.randn(4, 3, 4, 4), torch.tensor([0.3, 0.5]))
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(*args)
    for got, want in zip(compiled, block(*args)):
        assert_rel_close(got, want, 1e-6, "compiled vs eager")
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("fastdiff" in t for t in targets), targets
    assert any("aten" in t for t in targets), targets


@pytest.mark.parametrize("backend", ["torch", "auto"], ids=["reference", "interpreter"])
def test_unet_compiles_fullgraph_on_the_cpu(monkeypatch, backend):
    """torch.compile(fullgraph=True) of a class-conditional UNet with attention and fastdiff's ops: no graph break
    (the UNet's host-side label check is skipped while tracing) and the eager output, on the reference path and
    under the interpreter."""
    from fastdiff.models import UNet

    if backend == "auto" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=10).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 10])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = unet(x, t, y)
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")(x, t, y)
    assert_rel_close(compiled, eager, 1e-5, "compiled UNet vs eager")


def test_no_triton_no_triton_ops_and_no_warnings():
    """Without Triton installed (the README's first command on a CPU wheel), importing fastdiff defines no Triton ops
    and logs nothing (torch would warn once per op), and sampling's ops still run."""
    script = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from fastdiff import ops\n"
        "assert ops.triton_ops() == {}, ops.triton_ops()\n"
        "print(ops.group_norm_silu(torch.randn(1, 4, 2, 2), 2).shape)\n"
    )
    proc = _child("-c", script, FASTDIFF_BACKEND="auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 4, 2, 2])" in proc.stdout
    assert "Triton not available" not in proc.stderr and "triton" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_import_does_not_load_the_compiler_stack():
    """Importing fastdiff loads neither torch's compiler (dynamo, inductor) nor Triton: the Triton ops are defined
    at the first trace, so plain eager use never pays their import (about a second here)."""
    script = ("import sys, torch\n"
              "import fastdiff, fastdiff.ops, fastdiff.pipelines\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules))\n")
    proc = _child("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
