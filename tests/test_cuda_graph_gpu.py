"""CUDA graphs on a real GPU (all skipped without CUDA). tests/test_cuda_graph.py checks the cache logic on the
CPU with the graph API faked.

Graphed sampling equals eager sampling for DDIM (η > 0), DDPM (ᾱ as per-sample device tensors in the graph, one graph
for every step, and a zero-terminal-SNR schedule), Euler and DPM-Solver (the UNet call graphed, the update eager),
with cross-attention to a context, and with the Triton kernels (FASTDIFF_BACKEND unset). Replaced weights are
captured again: ``.half()``/``.float()``, ``load_state_dict(assign=True)``, an adapter. A failed capture falls back
and leaves the default stream current. All graphs use one pool. A pipeline on cuda:1 runs while cuda:0 is current.
``to("cpu")`` drops the graphs. A text pipeline with a ControlNet and an IP-Adapter in one call: the wrapped
denoiser is captured once and replayed with new control maps, image prompts and scales.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fastdiff import dispatch
from fastdiff.models import UNet
from fastdiff.pipelines import DiffusionPipeline
from fastdiff.pipelines.cuda_graph import GraphCache
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from tests.utils import assert_rel_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = 1e-4  # graphed vs eager: the same kernels, but ᾱ as (B,) fp32 tensors in a graph vs host floats eagerly


def tiny_unet(num_classes=10, context_dim=None):
    torch.manual_seed(0)
    return UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=num_classes,
                context_dim=context_dim).eval()


def cuda_pipe(scheduler, device="cuda", **unet_kwargs):
    return DiffusionPipeline(tiny_unet(**unet_kwargs), scheduler, sample_size=8).to(device)


def eager_and_graphed(pipe, **kw):
    """(eager, graphed, graphed again) samples of the same call; the graphs stay enabled afterwards."""
    pipe.disable_cuda_graph()
    eager = pipe(**kw)
    pipe.enable_cuda_graph()
    return eager, pipe(**kw), pipe(**kw)


KW = dict(batch_size=2, num_inference_steps=4, generator=0, class_labels=[1, 2], guidance_scale=2.0,
          output_type="pt", progress=False)


@pytest.mark.parametrize("scheduler, extra", [
    (DDIMScheduler(), {"eta": 0.8}),
    (DDIMScheduler(), {}),
    (DDPMScheduler(), {}),
    (DDPMScheduler(variance_type="fixed_large", clip_sample=True), {}),
    (DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"), {}),
    (EulerDiscreteScheduler(), {}),
    (DPMSolverMultistepScheduler(), {}),
], ids=["ddim-eta", "ddim", "ddpm", "ddpm-large-clip", "ddpm-zero-snr", "euler", "dpm"])
def test_graphed_sampling_equals_eager(scheduler, extra):
    pipe = cuda_pipe(scheduler)
    eager, graphed, again = eager_and_graphed(pipe, **KW, **extra)
    cache = pipe._cuda_graphs
    assert_rel_close(graphed, eager, TOL, f"{type(scheduler).__name__}: graphed vs eager")
    assert torch.equal(graphed, again), "a second graphed call replays the same graph"
    # one graph for all steps (DDPM's last step without noise included), replayed at every step of both calls
    assert cache.captures == 1 and len(cache) == 1 and cache.failures == 0
    assert cache.replays == 2 * KW["num_inference_steps"]
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_cross_attention_context():
    pipe = cuda_pipe(DDIMScheduler(), num_classes=None, context_dim=16)
    gen = torch.Generator().manual_seed(1)
    context, negative = torch.randn(2, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen)
    kw = dict(batch_size=2, num_inference_steps=3, generator=0, guidance_scale=3.0, context=context,
              negative_context=negative, output_type="pt", progress=False)
    eager, graphed, _ = eager_and_graphed(pipe, **kw)
    assert_rel_close(graphed, eager, TOL, "cross-attention: graphed vs eager")
    other = pipe(**{**kw, "context": context.flip(0)})  # new context values, same graph
    pipe.disable_cuda_graph()
    assert_rel_close(other, pipe(**{**kw, "context": context.flip(0)}), TOL, "a new context through the graph")


def test_replaced_weights_are_captured_again():
    pipe = cuda_pipe(DDIMScheduler())
    pipe.enable_cuda_graph()
    cache = pipe._cuda_graphs

    def check(what, captures=None):
        """Graphed equals eager; ``captures`` (None: either way) is the capture count expected after the call."""
        graphed = pipe(**KW)
        pipe._cuda_graphs = None  # eager, keeping the cache (disable_cuda_graph() would empty it)
        eager = pipe(**KW)
        pipe._cuda_graphs = cache
        assert_rel_close(graphed, eager, TOL, what)
        if captures is not None:
            assert cache.captures == captures, f"{what}: {cache.captures} captures, expected {captures}"

    check("first capture", 1)
    with torch.no_grad():
        pipe.unet.load_state_dict({k: v * 0.9 for k, v in pipe.unet.state_dict().items()})
    check("in-place update: the same graph", 1)
    pipe.unet.half().float()  # the new storages may land where the old ones were (no recapture): correct either way
    check(".half().float()")
    n = cache.captures
    keep = [p.detach() for p in pipe.unet.parameters()]  # hold the old storages: the new ones land elsewhere
    pipe.unet.half().float()
    check(".half().float() at new addresses", n + 1)
    del keep
    pipe.unet.load_state_dict({k: v.clone() for k, v in pipe.unet.state_dict().items()}, assign=True)
    check("load_state_dict(assign=True)", n + 2)
    pipe.unet.conv_out = nn.Sequential(pipe.unet.conv_out, nn.Identity())
    check("an adapter module", n + 3)
    handle = pipe.unet.conv_out.register_forward_hook(lambda module, args, out: out * 0.5)
    check("a forward hook", n + 4)
    handle.remove()


def test_fp16_pipeline_and_cast():
    pipe = cuda_pipe(DDPMScheduler())
    pipe.enable_cuda_graph()
    pipe(**KW)
    pipe.to(dtype=torch.float16)
    assert pipe._cuda_graphs is not None and len(pipe._cuda_graphs) == 0  # a cast empties the cache
    eager, graphed, _ = eager_and_graphed(pipe, **KW)
    assert_rel_close(graphed, eager, 1e-2, "fp16: graphed vs eager")  # ᾱ as fp32 tensors vs floats, fp16 x_t


def test_triton_kernels_in_the_graph(monkeypatch):
    """With the backend on auto (conftest sets FASTDIFF_BACKEND=torch for the suite), the graph holds the Triton
    kernels: the fused step, GroupNorm+SiLU and attention."""
    if not dispatch.triton_available():
        pytest.skip("Triton is not installed")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    for scheduler in (DDIMScheduler(), DDPMScheduler()):
        pipe = cuda_pipe(scheduler)
        dispatch.reset_counts()
        eager, graphed, again = eager_and_graphed(pipe, **KW, **({"eta": 0.5} if isinstance(scheduler,
                                                                                            DDIMScheduler) else {}))
        op = "ddim_step" if isinstance(scheduler, DDIMScheduler) else "ddpm_step"
        assert dispatch.counts().get((op, "triton")), dispatch.counts()
        assert dispatch.counts().get(("group_norm_silu", "triton")), dispatch.counts()
        assert pipe._cuda_graphs.captures == 1 and pipe._cuda_graphs.failures == 0
        assert_rel_close(graphed, eager, TOL, f"{op} on Triton: graphed vs eager")
        assert torch.equal(graphed, again)


class SyncsInForward(nn.Module):
    """``.item()`` in forward: a host sync, which a capture does not allow (the warm-up runs it fine)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t, class_labels=None, context=None):
        scale = float(x.abs().max().item() > -1.0)
        return self.lin(x) * scale


def test_failed_capture_falls_back_and_leaves_the_default_stream_current(caplog):
    cache = GraphCache()
    bad, good = SyncsInForward().cuda(), nn.Linear(4, 4).cuda()
    x, t = torch.randn(3, 4, device="cuda"), torch.zeros(3, device="cuda")
    with caplog.at_level(logging.WARNING, logger="fastdiff"), torch.no_grad():
        got = cache.run(bad, x, t, None, None)
        assert torch.equal(got, bad(x, t))
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert cache.failures == 1 and cache.captures == 0 and len(cache._failed) == 1
        messages = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
        assert len(messages) == 1 and "previous error" not in messages[0], messages
        assert torch.equal(cache.run(bad, x, t, None, None), bad(x, t))  # eager again, no second attempt
        assert cache.failures == 1

        def linear(x, t, class_labels=None, context=None):
            return good(x)

        assert_rel_close(cache.run(linear, x, t, None, None), good(x), 1e-6, "the next capture works")
        assert cache.captures == 1
    torch.cuda.synchronize()


def test_graphs_share_one_pool():
    pipe = cuda_pipe(DDIMScheduler())
    pipe.enable_cuda_graph()
    for batch in (1, 2, 3):
        pipe(**{**KW, "batch_size": batch, "class_labels": [1] * batch})
    cache = pipe._cuda_graphs
    assert len(cache) == 3 and cache._pool is not None
    assert {graph.graph.pool() for graph in cache._graphs.values()} == {cache._pool}
    assert len(cache._streams) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_pipeline_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    pipe = cuda_pipe(DDPMScheduler(), device="cuda:1")
    eager, graphed, _ = eager_and_graphed(pipe, **KW)
    assert_rel_close(graphed, eager, TOL, "cuda:1: graphed vs eager")
    assert list(pipe._cuda_graphs._streams) == [torch.device("cuda", 1)]
    assert torch.cuda.current_device() == 0


def test_to_cpu_drops_the_graphs():
    pipe = cuda_pipe(DDIMScheduler())
    pipe.enable_cuda_graph()
    on_gpu = pipe(**KW)
    cache = pipe._cuda_graphs
    pipe.to("cpu")
    assert pipe._cuda_graphs is None and len(cache) == 0
    on_cpu = pipe(**KW)  # eager on the CPU
    assert_rel_close(on_cpu, on_gpu, 2e-2, "CPU after CUDA")  # loose: the GPU's convolutions may run in TF32
    pipe.to("cuda").enable_cuda_graph()
    assert_rel_close(pipe(**KW), on_gpu, TOL, "back on CUDA")


def test_controlnet_and_ip_adapter_graphed_equal_eager():
    """The tiny text pipeline with a ControlNet and an IP-Adapter (both perturbed so they act) on the GPU: the
    denoiser (IP-Adapter wrapper around the ControlNet wrapper, with the fused guided DDIM step) is captured once;
    new control maps, image prompts and scales replay the same graph and equal eager sampling."""
    from model_factories import tiny_text_pipeline
    from test_controlnet_pipeline import edge_maps, make_controlnet
    from test_ip_adapter import digits, make_adapter

    pipe = tiny_text_pipeline(seed=0)
    pipe.controlnet = make_controlnet(pipe.unet)
    pipe.image_encoder, pipe.ip_adapter = make_adapter(pipe.unet)
    pipe._check_ip_adapter()
    pipe.to("cuda")
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    cases = [(edge_maps(2, seed=5), digits(2, seed=5), 1.0, 1.0), (edge_maps(2, seed=6), digits(2, seed=6), 0.5, 0.7)]

    def run(maps, images, scale, ip_scale):
        return pipe(prompt=["", "a bold seven"], latents=latents, image=maps, controlnet_conditioning_scale=scale,
                    ip_adapter_image=images, ip_adapter_scale=ip_scale, num_inference_steps=4, output_type="pt",
                    progress=False)

    eager = [run(*case) for case in cases]
    pipe.enable_cuda_graph()
    graphed = [run(*case) for case in cases]
    for i, (g, e) in enumerate(zip(graphed, eager)):
        assert_rel_close(g, e, TOL, f"ControlNet + IP-Adapter case {i}: graphed vs eager")
    assert pipe._cuda_graphs.captures == 1 and pipe._cuda_graphs.failures == 0
    assert (eager[0] - eager[1]).abs().max() > 1e-3  # the cases differ, so a stale graph would fail
