"""GPU-only paths, checked here where they can be (Triton's interpreter, CUDA mocked) and ready to run on a GPU:
the launch device guard, B·H beyond the grid limit, 32-bit offset limits, the autotuner inside a CUDA-graph
capture, and noise drawn on the CPU for a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
from utils import assert_rel_close

from fastdiff import dispatch, ops, reference
from fastdiff.schedulers import base as scheduler_base

CUDA = torch.cuda.is_available()
interpreter = pytest.mark.skipif(not dispatch.interpret_enabled(), reason="needs TRITON_INTERPRET=1")


def test_cuda_launches_run_with_the_tensors_device_current(monkeypatch):
    entered, calls = [], []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    class FakeKernels:
        @staticmethod
        def attention(*args):
            calls.append(len(entered))
            return "out"

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(dispatch, "select", lambda op, device, backend: "triton")
    monkeypatch.setattr(dispatch, "load_kernels", lambda family: FakeKernels)
    assert ops._run("attention", torch.device("cuda", 1), "auto", "attention", 1, 2) == "out"
    assert entered == [torch.device("cuda", 1)] and calls == [1]  # the host ran inside the guard
    entered.clear()
    monkeypatch.setattr(dispatch, "select", lambda op, device, backend: "interpreter")
    ops._run("attention", torch.device("cpu"), "auto", "attention", 1, 2)
    assert entered == []  # no CUDA guard for CPU tensors


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_attention_beyond_the_grid_limit_runs_in_slices(monkeypatch, dtype):
    kernels = dispatch.load_kernels("attention")
    monkeypatch.setattr(dispatch.load_kernels("target"), "MAX_GRID_Y", 3)  # B·H = 8 → slices of 3, 3, 2
    q = torch.randn(2, 4, 20, 32).to(dtype)
    k, v = torch.randn(2, 4, 9, 32).to(dtype), torch.randn(2, 4, 9, 32).to(dtype)
    out = kernels.attention(q, k, v, 0.3)
    expected = reference.attention(q.double(), k.double(), v.double(), 0.3)
    assert_rel_close(out, expected, 2e-3 if dtype == torch.float16 else 1e-5, "attention in B·H slices")


def test_attention_int32_span_is_checked():
    kernels = pytest.importorskip("fastdiff.kernels.attention")
    ok = [(1 << 20, 1 << 19, 64, 1)] * 4
    kernels._check_int32_span(ok, (4096, 77, 77, 4096), 64)
    wide = [(0, 0, 1 << 20, 1), (0, 0, 64, 1), (0, 0, 64, 1), (0, 0, 64, 1)]  # q rows 2^20 elements apart
    with pytest.raises(ValueError, match=r"one \(batch, head\) of q spans"):
        kernels._check_int32_span(wide, (4096, 77, 77, 4096), 64)


def test_group_norm_int32_limit_is_a_clear_error():
    kernels = pytest.importorskip("fastdiff.kernels.group_norm_silu")
    x = torch.empty(1, 2**16, 2**8, 2**7, dtype=torch.float16, device="meta")  # C·HW = 2^31, no memory
    with pytest.raises(ValueError, match=r"C·HW = 2147483648"):
        kernels.group_norm_silu(x, 32, None, None, 1e-5, "silu")


def test_tuned_config_reads_the_autotuner_cache(monkeypatch):
    kernels = pytest.importorskip("fastdiff.kernels.attention")
    config = kernels._CONFIGS[0]
    cache = getattr(kernels._attention_kernel_tuned, "cache", None)
    if cache is None:
        pytest.skip("the interpreter's stand-in has no autotuner cache")
    monkeypatch.setitem(cache, (4096, 77, 64, *("torch.float16",) * 4), config)
    assert kernels._tuned_config(4096, 77, 64, torch.float16) is config
    assert kernels._tuned_config(4096, 78, 64, torch.float16) is None


def test_noise_for_a_gpu_goes_through_pinned_memory(monkeypatch):
    moves = []
    noise = torch.randn(2, 3)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: moves.append("pin") or self)
    original_to = torch.Tensor.to

    def fake_to(self, device, *args, non_blocking=False, **kwargs):
        if torch.device(device).type == "cuda":
            moves.append(("to cuda", non_blocking))
            return self
        return original_to(self, device, *args, non_blocking=non_blocking, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    assert scheduler_base._to_device(noise, torch.device("cuda")) is noise
    assert moves == ["pin", ("to cuda", True)]
    moves.clear()
    assert torch.equal(scheduler_base._to_device(noise, torch.device("cpu")), noise) and moves == []


# --------------------------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@gpu
def test_cuda_noise_from_a_cpu_generator_matches_the_cpu_draw():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    on_gpu = scheduler_base.randn_tensor((2, 4, 8, 8), generator=g1, device="cuda")
    on_cpu = scheduler_base.randn_tensor((2, 4, 8, 8), generator=g2, device="cpu")
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    q = torch.randn(1, 2, 64, 64, device="cuda:1", dtype=torch.float16)
    out = ops.attention(q, q, q, backend="triton")
    assert out.device == torch.device("cuda:1")
    assert_rel_close(out, reference.attention(q.double().cpu(), q.double().cpu(), q.double().cpu(), 64**-0.5),
                     2e-3, "attention on cuda:1")
    x = torch.randn(2, 64, 8, 8, device="cuda:1", dtype=torch.float16)
    y = ops.group_norm_silu(x, 32, backend="triton")
    assert_rel_close(y, reference.group_norm_silu(x.double().cpu(), 32, None, None, 1e-5, "silu"), 5e-3, "gn cuda:1")


@gpu
def test_attention_autotuner_is_not_run_inside_a_capture():
    """A shape the autotuner has not seen, first met inside a user's CUDA-graph capture: no benchmarking there (the
    heuristic default runs), a right answer on replay, and nothing added to the autotuner's cache."""
    from fastdiff.kernels import attention as kernels

    cache = kernels._attention_kernel_tuned.cache
    before = set(cache)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q = torch.randn(1, 2, 301, 64, device="cuda", dtype=torch.float16)  # N = 301: a new autotune key
        with torch.cuda.graph(graph):
            out = ops.attention(q, q, q, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert set(cache) == before
    assert_rel_close(out, reference.attention(q.double(), q.double(), q.double(), 64**-0.5), 2e-3, "graphed")


@gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_compiles_the_triton_kernels_into_the_model(monkeypatch, mode):
    """torch.compile(fullgraph=True) with inductor of a UNet on CUDA: the generated code launches fastdiff's Triton
    kernels itself (the triton ops, not an opaque custom-op call), and the output matches eager. "reduce-overhead"
    puts them in inductor's CUDA graphs (two calls: recorded, then replayed)."""
    from torch._inductor.utils import run_and_get_code

    from fastdiff.models import UNet

    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    torch.manual_seed(0)
    unet = UNet(in_channels=4, out_channels=4, base_channels=32, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=8, attention_head_dim=16, num_classes=10).cuda().half().eval()
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    t, y = torch.tensor([10, 500], device="cuda"), torch.tensor([3, 7], device="cuda")
    with torch.no_grad():
        eager = unet(x, t, y)
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True, mode=None if mode == "default" else mode)
        out, code = run_and_get_code(compiled, x, t, y)
        again = compiled(x, t, y)
    source = "\n".join(code)
    assert "_group_norm_silu" in source and "_attention_kernel" in source, "fastdiff kernels not in inductor's code"
    assert "torch.ops.fastdiff.group_norm_silu.default" not in source
    assert_rel_close(out, eager, 5e-3, "inductor vs eager")
    assert_rel_close(again, eager, 5e-3, "second call vs eager")
