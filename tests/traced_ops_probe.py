"""Run by tests/test_compile_traced.py in a child process (compiled Triton, not the interpreter; no GPU needed):
torch.compile(fullgraph=True) of fastdiff ops on fake CUDA tensors, planned for an H200 (sm_90, 132 SMs), with a
stand-in Triton driver so torch can analyse the kernels' TTIR. Prints one JSON line per case: the kernels in the
graph that reaches the backend, the fastdiff ops left opaque, and which tensors each kernel node would clone."""

from __future__ import annotations

import json
import os

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTDIFF_BACKEND"] = "auto"

import torch  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime import driver  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.kernels import compile_check, target  # noqa: E402


def _name(kernel) -> str:
    while not hasattr(kernel, "__name__") or type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel.__name__


def _cases(cuda):
    def randn(*shape, dtype=torch.float32, **kw):
        return torch.randn(*shape, dtype=dtype, device=cuda, **kw)

    small, w64, b64 = randn(2, 64, 8, 8, dtype=torch.bfloat16), randn(64), randn(64)
    yield "group_norm_silu single pass", lambda: ops.group_norm_silu(small, 32, w64, b64)
    x, w, b = randn(2, 320, 32, 32, dtype=torch.float16), randn(320), randn(320)
    yield "group_norm_silu NCHW", lambda: ops.group_norm_silu(x, 32, w, b)
    big = randn(1, 256, 128, 128, dtype=torch.float16).to(memory_format=torch.channels_last)
    yield "group_norm_silu channels_last, split", lambda: ops.group_norm_silu(big, 32, None, None)
    q, k = randn(2, 8, 256, 64, dtype=torch.float16), randn(2, 8, 77, 64, dtype=torch.float16)
    yield "attention fp16 cross", lambda: ops.attention(q, k, k)
    q32 = randn(1, 2, 64, 160)
    yield "attention fp32 D=160 (sliced)", lambda: ops.attention(q32, q32, q32)
    s, e2 = randn(4, 4, 16, 16), randn(8, 4, 16, 16)
    yield "ddim_step float alphas + CFG", lambda: ops.ddim_step(s, e2, 0.4, 0.7, guidance_scale=3.0)
    e, a, a_prev, z = randn(4, 4, 16, 16), randn(4), randn(4), randn(4, 4, 16, 16)
    yield "ddpm_step tensor alphas", lambda: ops.ddpm_step(s, e, a, a_prev, noise=z)
    yield "linear_step 2 inputs 2 outputs + CFG", lambda: ops.linear_step(
        s, e2, [e, z], coefficients=[[0.5, -0.2, 0.0, 0.1], [1.0, 0.0, 0.3, 0.0, -0.4]], guidance_scale=3.0)

    def unet_block():  # ops in a row with torch code between them, as in a UNet block
        h = ops.group_norm_silu(x, 32, None, None)
        t = h.flatten(2).transpose(1, 2).reshape(2, 1024, 8, 40).transpose(1, 2)
        return ops.attention(t, t, t).sum() + h.float().mean()
    yield "block: group_norm_silu → attention", unet_block


def main() -> None:
    driver.set_active(compile_check._StandInDriver(90))
    with target.planning_for(90, compile_check.ARCHS[90]["sms"]):
        with FakeTensorMode():  # the inputs: fake CUDA tensors (no GPU here)
            cases = list(_cases(torch.device("cuda")))
        for name, fn in cases:
            graphs = []

            def capture(gm, example_inputs, graphs=graphs):
                graphs.append(gm)
                return lambda *args: (_ for _ in ()).throw(RuntimeError("traced only"))

            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
            try:
                compiled()
            except RuntimeError as exc:
                if "traced only" not in str(exc):
                    raise
            nodes = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
            kernels, clones, opaque = [], [], []
            for node in nodes:
                target_name = str(node.target)
                if "triton_kernel_wrapper" in target_name:
                    kernels.append(_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])))
                    clones.append(sorted(node.kwargs.get("tensors_to_clone", [])))
                elif "fastdiff" in target_name:
                    opaque.append(target_name)
            print(json.dumps({"case": name, "kernels": kernels, "clones": clones, "opaque": opaque}), flush=True)


if __name__ == "__main__":
    main()
