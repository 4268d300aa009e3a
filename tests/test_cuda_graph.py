"""The CUDA-graph cache (fastdiff.pipelines.cuda_graph) on the CPU: the cache logic runs on CPU tensors with
torch.cuda's graph and stream API replaced by small fakes.

Covered here: a model's fingerprint changes, so its graphs are captured again. A failed capture logs its cause,
falls back to eager, exits its stream context, drops its graph and remembers its key. All graphs share one pool and
one capture stream per device, and capture runs with the inputs' device current. ``to("cpu")`` drops the graphs, and
off CUDA the cache is never used. DDPM's last step (no noise) replays the same graph with a zero noise buffer, and
the fused step with z = 0 equals the step without noise.

tests/test_cuda_graph_gpu.py runs the real thing on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from fastdiff import dispatch
from fastdiff.models import UNet
from fastdiff.pipelines import DiffusionPipeline
from fastdiff.pipelines import cuda_graph
from fastdiff.pipelines.cuda_graph import GraphCache, fingerprint
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTURE_FAILED = "CUDA error: operation failed due to a previous error during capture"  # what capture_end says


def tiny_unet(num_classes=10):
    torch.manual_seed(0)
    return UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=num_classes).eval()


# --------------------------------------------------------------------------------------------- fake torch.cuda
class FakeStream:
    def __init__(self, device=None, priority=0, name="side"):
        self.device, self.name = device, name

    def wait_stream(self, other):
        pass

    def __repr__(self):
        return f"FakeStream({self.name}, {self.device})"


class FakeCUDAGraph:
    """Records nothing. Its replay runs ``body``, which the fixture sets after a successful capture to recompute the
    static output from the static inputs: what a real replay does."""

    def __init__(self):
        self.body = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.body()


class FakeCuda:
    """The state behind the fakes: the current stream and device stacks, the captures seen, the graphs made."""

    def __init__(self, capture_end_raises: bool = True):
        self.default = FakeStream(name="default")
        self.current: FakeStream | None = None  # the current stream (None: the default stream)
        self.devices: list = []  # current device stack
        self.capturing = False
        self.capture_end_raises = capture_end_raises  # on an error inside the capture, as a real one does
        self.captures: list[dict] = []
        self.graphs: list[weakref.ref] = []
        self.pools: list[object] = []
        self.syncs = 0

    # the torch.cuda functions
    def Stream(self, device=None, priority=0):  # noqa: N802 (torch's name)
        return FakeStream(device)

    def current_stream(self, device=None):
        return self.current or self.default

    @contextlib.contextmanager
    def stream(self, s):
        """Like torch.cuda.stream: remembers the current stream on entry and makes it current again on exit."""
        previous, self.current = self.current, s
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def device(self, d):
        self.devices.append(d)
        try:
            yield
        finally:
            self.devices.pop()

    def synchronize(self, device=None):
        self.syncs += 1

    def graph_pool_handle(self):
        self.pools.append(object())
        return self.pools[-1]

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        graph = FakeCUDAGraph()
        self.graphs.append(weakref.ref(graph))
        return graph

    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        return FakeCapture(self, cuda_graph, pool, stream)


class FakeCapture:
    """Like torch.cuda.graph: enter makes the capture stream current, exit runs capture_end and only then restores
    the stream, so when capture_end raises the capture stream stays current. (A module-level class: one made per
    call would sit in a reference cycle and keep the graph alive until a garbage collection.)"""

    def __init__(self, fake: FakeCuda, cuda_graph, pool, stream):
        self.fake, self.cuda_graph, self.pool, self.stream = fake, cuda_graph, pool, stream

    def __enter__(self):
        fake = self.fake
        fake.captures.append({"pool": self.pool, "stream": self.stream,
                              "device": fake.devices[-1] if fake.devices else None,
                              "outer_stream": fake.current_stream()})
        self.previous, fake.current = fake.current, self.stream
        fake.capturing = True

    def __exit__(self, exc_type, exc, tb):
        self.fake.capturing = False
        if exc_type is not None and self.fake.capture_end_raises:
            raise RuntimeError(CAPTURE_FAILED)
        self.fake.current = self.previous


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's graph/stream API faked, and CPU tensors accepted as graph inputs."""
    fake = FakeCuda()
    for name in ("Stream", "current_stream", "stream", "device", "synchronize", "graph_pool_handle", "CUDAGraph",
                 "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(cuda_graph, "_is_cuda", lambda tensor: True)
    record = cuda_graph._Graph._record

    def record_with_replay(self, pool, stream):
        graph, out = record(self, pool, stream)
        graph.body = lambda: self.out.copy_(self._forward())  # a replay recomputes the static output
        return graph, out

    monkeypatch.setattr(cuda_graph._Graph, "_record", record_with_replay)
    return fake


def step_inputs(batch=2, guidance=True):
    x = torch.randn(batch, 1, 8, 8)
    model_in = torch.cat([x, x]) if guidance else x
    labels = torch.tensor([10] * batch + [3] * batch) if guidance else torch.tensor([3] * batch)
    return x, model_in, labels


# --------------------------------------------------------------------------------------------- DDPM: z = 0 is no noise
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type, clip", [("epsilon", True), ("v_prediction", False), ("sample", True)])
def test_fused_ddpm_step_with_zero_noise_equals_no_noise(monkeypatch, backend, variance_type, prediction_type, clip):
    """What lets DDPM use one graph per shape: at every step, the last (t = 0, σ² clamped at 1e-20 for
    fixed_small) included, the fused op with noise = zeros gives exactly what it gives with noise = None, both
    x_{t−1} and the (clipped) x̂0. Checked with float alphas (step()) and per-sample (B,) alphas (a graph), with
    guidance, on the reference and on the Triton kernel (the interpreter here)."""
    if backend == "triton" and not dispatch.interpret_enabled():
        pytest.skip("the Triton kernel on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    sched = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip)
    sched.set_timesteps(4)
    x = torch.randn(2, 1, 8, 8) * 2
    out = torch.randn(4, 1, 8, 8) * 2
    assert sched.timesteps[-1] == 0
    for t in sched.timesteps.tolist():
        plan = sched.fused_step(t, x, generator=torch.Generator().manual_seed(t))
        assert (plan.noise is None) == (t == 0)
        no_noise = dataclasses.replace(plan, noise=None)
        zero_noise = dataclasses.replace(plan, noise=torch.zeros_like(x))
        a_t = torch.full((2,), plan.alpha_prod_t)
        a_prev = torch.full((2,), plan.alpha_prod_t_prev)
        for alphas in ((), (a_t, a_prev)):
            prev0, x00 = no_noise.run(x, out, 1.5, *alphas)
            prev1, x01 = zero_noise.run(x, out, 1.5, *alphas)
            assert torch.equal(prev0, prev1), f"t={t}: x_(t-1) with z = 0 differs from no noise"
            assert torch.equal(x00, x01), f"t={t}: x0 with z = 0 differs from no noise"
        if t > 0:  # the noise does matter where there is some
            assert not torch.equal(plan.run(x, out, 1.5)[0], no_noise.run(x, out, 1.5)[0])
    assert dispatch.counts().get(("ddpm_step", "interpreter" if backend == "triton" else "torch"))


# --------------------------------------------------------------------------------------------- one graph per shape
@pytest.mark.parametrize("scheduler_cls, eta", [(DDPMScheduler, 0.0), (DDIMScheduler, 0.7), (DDIMScheduler, 0.0)])
def test_a_whole_schedule_replays_one_graph(fake_cuda, scheduler_cls, eta):
    """DDPM's last step (no noise) replays the same graph as the others, with the noise buffer zeroed. DDIM
    (η > 0 or η = 0) uses one graph too. Every replay equals scheduler.step()."""
    unet, sched, s = tiny_unet(), scheduler_cls(), 2.5
    sched.set_timesteps(5)
    cache = GraphCache(4)
    x, _, labels = step_inputs()
    extra = {"eta": eta} if eta else {}
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            model_in, t_batch = torch.cat([x, x]), torch.full((4,), float(t))
            expected = sched.step(unet(model_in, t_batch, class_labels=labels), t, x, guidance_scale=s,
                                  generator=torch.Generator().manual_seed(t), **extra).prev_sample
            plan = sched.fused_step(t, x, generator=torch.Generator().manual_seed(t), **extra)
            got = cache.run_step(unet, plan, s, model_in, t_batch, labels, None, x)
            assert_rel_close(got, expected, 1e-6, f"replayed step at t={t}")
            x = expected
    assert cache.captures == 1 and len(cache) == 1 and cache.replays == 5
    (graph,) = cache._graphs.values()
    assert graph.graph.replays == 5
    if scheduler_cls is DDPMScheduler:
        assert plan.noise is None and torch.count_nonzero(graph.noise) == 0  # the last step: z = 0
    else:
        assert (graph.noise is None) == (eta == 0)


def test_each_guidance_scale_is_its_own_graph(fake_cuda):
    """The fused ops take guidance_scale as a Python float, so a capture bakes it in: another value, another graph."""
    unet, sched, cache = tiny_unet(), DDIMScheduler(), GraphCache(4)
    sched.set_timesteps(2)
    x, model_in, labels = step_inputs()
    t = sched.timesteps[0].item()
    plan = sched.fused_step(t, x)
    with torch.no_grad():
        for s in (2.0, 3.0, 2.0):
            cache.run_step(unet, plan, s, model_in, torch.full((4,), float(t)), labels, None, x)
    assert cache.captures == 2 and len(cache) == 2


# --------------------------------------------------------------------------------------------- pool, stream, device
def test_graphs_share_one_pool_and_capture_stream_on_the_inputs_device(fake_cuda):
    unet, cache = tiny_unet(), GraphCache(8)
    with torch.no_grad():
        for batch in (1, 2, 3):
            x, model_in, labels = step_inputs(batch, guidance=False)
            cache.run(unet, model_in, torch.full((batch,), 5.0), labels, None)
            assert fake_cuda.current is None and fake_cuda.devices == []  # both contexts exited
    assert cache.captures == 3 and len(fake_cuda.pools) == 1
    pools = {id(c["pool"]) for c in fake_cuda.captures}
    streams = {id(c["stream"]) for c in fake_cuda.captures}
    assert pools == {id(fake_cuda.pools[0])} and len(streams) == 1
    for capture in fake_cuda.captures:
        assert capture["device"] == model_in.device  # the inputs' device current during capture
        assert capture["stream"].device == model_in.device  # the side stream made on that device
        assert capture["outer_stream"] is capture["stream"]  # warm-up and capture on the same side stream
    cache.clear()
    with torch.no_grad():
        cache.run(unet, model_in, torch.full((3,), 5.0), labels, None)
    assert len(fake_cuda.pools) == 2  # a cleared cache starts a new pool


def test_lru_evicts_the_oldest_graph(fake_cuda):
    unet, cache = tiny_unet(), GraphCache(2)
    with torch.no_grad():
        for batch in (1, 2, 3, 2):
            x, model_in, labels = step_inputs(batch, guidance=False)
            cache.run(unet, model_in, torch.full((batch,), 5.0), labels, None)
    assert cache.captures == 3 and len(cache) == 2
    assert sorted(key[1][0][0] for key in cache._graphs) == [2, 3]


# --------------------------------------------------------------------------------------------- failed capture
class SyncsWhileCapturing(nn.Module):
    """A model that does something a capture forbids (a host sync, say) when the fake is capturing."""

    def __init__(self, fake):
        super().__init__()
        self.fake, self.lin = fake, nn.Linear(4, 4)

    def forward(self, x, t, class_labels=None, context=None):
        if self.fake.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (the cause)")
        return self.lin(x)


@pytest.mark.parametrize("capture_end_raises", [True, False])
def test_failed_capture_logs_the_cause_runs_eagerly_and_frees_the_graph(fake_cuda, caplog, capture_end_raises):
    """The log names the first exception raised inside the capture, not capture_end's consequence. The capture
    stream is no longer current afterwards. The failed graph object is freed at once (no reference cycle holds
    it), which releases its pool. The key is remembered, so there is no second attempt, and each call runs
    eagerly."""
    fake_cuda.capture_end_raises = capture_end_raises
    model = SyncsWhileCapturing(fake_cuda)
    cache = GraphCache()
    x, t = torch.randn(3, 4), torch.zeros(3)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a reference cycle must not be collected behind the test's back
    try:
        with caplog.at_level(logging.WARNING, logger="fastdiff"), torch.no_grad():
            got = cache.run(model, x, t, None, None)
            assert torch.equal(got, model(x, t))
            assert fake_cuda.current is None and fake_cuda.devices == []
            assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0]() is None, "the failed graph is still alive"
            assert torch.equal(cache.run(model, x, t, None, None), model(x, t))
    finally:
        if gc_was_enabled:
            gc.enable()
    messages = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(messages) == 1
    assert "not permitted when stream is capturing (the cause)" in messages[0]
    assert CAPTURE_FAILED not in messages[0]
    assert len(fake_cuda.graphs) == 1 and len(fake_cuda.captures) == 1  # no second attempt
    assert cache.failures == 1 and cache.captures == 0 and len(cache) == 0 and len(cache._failed) == 1
    assert fake_cuda.syncs == 1


def test_a_failed_step_capture_runs_the_step_eagerly(fake_cuda):
    model = SyncsWhileCapturing(fake_cuda)
    sched = DDIMScheduler()
    sched.set_timesteps(3)
    x = torch.randn(2, 4)
    plan = sched.fused_step(sched.timesteps[0].item(), x)
    with torch.no_grad():
        got = GraphCache().run_step(model, plan, None, x, torch.zeros(2), None, None, x)
        expected = sched.step(model(x, None), sched.timesteps[0].item(), x).prev_sample
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------- weights
def test_fingerprint_sees_replaced_weights_modules_and_hooks_not_in_place_updates():
    unet = tiny_unet()
    base = fingerprint(unet)
    assert fingerprint(unet) == base
    with torch.no_grad():
        unet.load_state_dict({k: v * 0.5 for k, v in unet.state_dict().items()})  # copied in place
    assert fingerprint(unet) == base
    keep = [p.detach() for p in unet.parameters()]  # the old storages stay allocated: new ones land elsewhere
    unet.half().float()
    assert fingerprint(unet) != base
    base = fingerprint(unet)
    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)
    assert fingerprint(unet) != base
    base = fingerprint(unet)
    handle = unet.conv_out.register_forward_hook(lambda m, args, out: out * 2)
    assert fingerprint(unet) != base
    handle.remove()
    assert fingerprint(unet) == base
    unet.conv_out = nn.Sequential(unet.conv_out)  # an adapter around the same weights
    assert fingerprint(unet) != base
    assert fingerprint(len) == (len,)  # a plain callable
    del keep


def test_a_changed_model_is_captured_again_and_only_its_graphs_are_dropped(fake_cuda, caplog):
    unet, other, cache = tiny_unet(), tiny_unet(), GraphCache(8)
    _, model_in, labels = step_inputs(2, guidance=False)
    t = torch.full((2,), 5.0)

    def run(model):
        with torch.no_grad():
            return cache.run(model, model_in, t, labels, None)

    first = run(unet)
    run(other)
    assert cache.captures == 2 and not cache.check(unet)  # nothing changed
    with torch.no_grad():
        unet.load_state_dict({k: v * 0.5 for k, v in unet.state_dict().items()})  # in place: the graph sees it
    assert not cache.check(unet)
    halved = run(unet)
    assert cache.captures == 2 and not torch.equal(halved, first)
    with torch.no_grad():
        assert_rel_close(halved, unet(model_in, t, class_labels=labels), 1e-6, "replay after an in-place update")

    keep = [p.detach() for p in unet.parameters()]
    unet.half().float()
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert cache.check(unet)  # graphs of unet dropped
    assert any("captured again" in r.getMessage() for r in caplog.records)
    assert len(cache) == 1 and next(iter(cache._graphs))[0] == id(other)
    run(unet)
    assert cache.captures == 3 and len(cache) == 2
    del keep

    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)
    run(unet)  # run() itself does not check again (too slow for every step): the pipeline checks once per call
    assert cache.captures == 3
    assert cache.check(unet)
    run(unet)
    assert cache.captures == 4

    unet.conv_out = nn.Sequential(unet.conv_out)
    assert cache.check(unet)
    with torch.no_grad():
        expected = unet(model_in, t, class_labels=labels)
    assert_rel_close(run(unet), expected, 1e-6, "after an adapter")
    assert cache.captures == 5 and len(cache) == 2 and not cache.check(other)


def test_a_change_also_forgets_failed_captures(fake_cuda):
    model = SyncsWhileCapturing(fake_cuda)
    cache = GraphCache()
    x, t = torch.randn(3, 4), torch.zeros(3)
    with torch.no_grad():
        cache.run(model, x, t, None, None)
    assert len(cache._failed) == 1
    model.lin = nn.Linear(4, 4)
    assert cache.check(model) and not cache._failed


# --------------------------------------------------------------------------------------------- off CUDA
def test_cpu_inputs_never_touch_the_graph_api():
    """With the real torch.cuda of a CPU build (whose graph API would raise), CPU inputs run eagerly."""
    unet, cache = tiny_unet(), GraphCache()
    sched = DDPMScheduler()
    sched.set_timesteps(2)
    x, model_in, labels = step_inputs()
    t = sched.timesteps[0].item()
    t_batch = torch.full((4,), float(t))
    with torch.no_grad():
        out = cache.run(unet, model_in, t_batch, labels, None)
        assert torch.equal(out, unet(model_in, t_batch, class_labels=labels))
        plan = sched.fused_step(t, x, generator=torch.Generator().manual_seed(0))
        prev = cache.run_step(unet, plan, 2.0, model_in, t_batch, labels, None, x)
        assert torch.equal(prev, plan.run(x, unet(model_in, t_batch, class_labels=labels), 2.0)[0])
    assert cache.captures == cache.replays == len(cache) == 0 and not cache._failed


def test_a_cpu_pipeline_never_uses_a_cache(monkeypatch):
    """A pipeline off CUDA samples eagerly even if a cache is there, for example after ``pipe.unet.to("cpu")``."""
    pipe = DiffusionPipeline(tiny_unet(), DDIMScheduler(), sample_size=8)
    kw = dict(batch_size=2, num_inference_steps=3, generator=0, class_labels=[1, 2], guidance_scale=2.0,
              output_type="pt", progress=False)
    eager = pipe(**kw)
    pipe._cuda_graphs = GraphCache()
    monkeypatch.setattr(GraphCache, "check", lambda self, model: pytest.fail("check() called off CUDA"))
    assert torch.equal(pipe(**kw), eager)
    assert pipe._cuda_graphs.captures == pipe._cuda_graphs.replays == 0


def test_to_cpu_drops_the_graphs_and_a_cast_on_cuda_empties_them(monkeypatch, caplog, fake_cuda):
    pipe = DiffusionPipeline(tiny_unet(), DDIMScheduler(), sample_size=8)
    cache = pipe._cuda_graphs = GraphCache()  # as enable_cuda_graph() makes it on CUDA
    _, model_in, labels = step_inputs(2, guidance=False)
    with torch.no_grad():
        cache.run(pipe.unet, model_in, torch.full((2,), 5.0), labels, None)
    assert len(cache) == 1
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert pipe.to("cpu") is pipe
    assert pipe._cuda_graphs is None and len(cache) == 0
    assert any("CUDA graphs dropped" in r.getMessage() for r in caplog.records)

    # still on CUDA (faked): a cast keeps the cache but empties it (the fingerprint would also notice)
    monkeypatch.setattr(DiffusionPipeline, "device", property(lambda self: torch.device("cuda")))
    cache = pipe._cuda_graphs = GraphCache()
    with torch.no_grad():
        cache.run(pipe.unet, model_in, torch.full((2,), 5.0), labels, None)
    pipe.to(dtype=torch.float32)
    assert pipe._cuda_graphs is cache and len(cache) == 0 and not cache._fingerprints and cache._pool is None
