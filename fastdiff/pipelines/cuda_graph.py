"""CUDA-graph replay of a denoising step: one graph per (model, shapes, dtype, step kind), in a bounded LRU.

What a graph holds. With a DDIM/DDPM scheduler, the whole step: the UNet call and the fused update
(``ops.ddim_step`` / ``ops.ddpm_step`` with ᾱ_t and ᾱ_prev as (B,) device tensors filled before each replay, the noise
copied into a static buffer). With the other schedulers, the UNet call; their update runs eagerly.

Keys. The model, the inputs' shapes, dtypes and devices, and for a whole step the op, its options and the guidance
scale. The guidance scale has to stay in the key: the fused ops take it as a Python float (their custom-op schema
says ``guidance_scale: Optional[float]``, and the Triton kernels take it as a scalar argument), so a capture bakes it
in. DDPM needs one graph per shape: its graph always reads a noise buffer, which is set to zeros at a step without
noise (t = 0). ``prev = mean + σ·z`` with z = 0 gives the mean, the same value as no noise, because σ is finite
(σ² = max(β̃_t, 1e-20) or β_t). The x̂0 output does not read z.

Weights. A graph reads the parameters and buffers at the addresses they had at capture. Weights copied in place
(``load_state_dict`` without ``assign``) are used by the next replay. :func:`fingerprint` records each tensor's
storage (data_ptr, dtype, shape, stride, device) and each submodule (the object and its hook ids) at capture. These
change with ``.half()``/``.float()``, ``.to()``, ``load_state_dict(assign=True)``, or a module or hook injected
after capture. :meth:`GraphCache.check` compares the fingerprint once per pipeline call (a full fingerprint of a
500-module UNet takes about 1 ms, too slow for every step). On a change it drops that model's graphs, which are then
captured again.

Memory. All graphs of a cache capture into one private pool (``torch.cuda.graph_pool_handle()``), not a pool each.
Graphs in a shared pool may reuse each other's temporaries, and a later capture may place its static output where an
earlier graph keeps temporaries. That is safe here: every replay runs on the device's current stream, and its output
is cloned right after on that same stream, before any other graph replays. The static inputs are allocated outside
the pool.

Capture. Warm-up and capture run with the inputs' device current and on a side stream of that device. The cache
owns that stream, so all captures that share the pool use the same stream. The stream context is entered here,
around ``torch.cuda.graph``, so it is exited even when capture fails (``torch.cuda.graph.__exit__`` skips restoring
the stream when ``capture_end`` raises). A failed capture logs its cause: the first exception raised inside the
capture, not the "operation failed due to a previous error" that ``capture_end`` raises next. The graph object is
dropped, which releases its hold on the pool. The key is remembered and that step runs eagerly from then on.

Off CUDA. The cache is never used: ``run``/``run_step`` run eagerly for non-CUDA inputs, the pipeline passes only
CUDA work, and ``Pipeline.to`` drops the cache when the pipeline leaves CUDA. Replaying an empty capture would return
the first step's output every time.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger("fastdiff")


def _is_cuda(tensor: Tensor) -> bool:
    """Whether ``tensor`` can feed a graph (CPU tests patch this to run the cache logic on CPU tensors)."""
    return tensor.device.type == "cuda"


def static_copy(store: dict, value: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """``value`` copied into the static tensor ``store`` keeps for its (shape, dtype, device) — made on first use,
    then filled in place — and returned: a per-call input a captured graph reads at a fixed address (a denoiser
    wrapper's control map, image tokens or scales). ``device``: where the static tensor lives (default value's)."""
    device = value.device if device is None else torch.device(device)
    key = (tuple(value.shape), value.dtype, device)
    static = store.get(key)
    if static is None:
        static = store[key] = torch.empty(value.shape, dtype=value.dtype, device=device)
    return static.copy_(value)


def fingerprint(model) -> tuple:
    """What a captured graph depends on in the model, besides its inputs, as a tuple compared with ``==``.

    For every submodule: the module object and the ids of its forward (pre-)hooks, so a swapped module, an injected
    adapter or a new hook shows up. For every parameter and buffer: (data_ptr, dtype, shape, stride, device), the
    memory the graph reads. The modules are held by reference, so their ids cannot be reused while the fingerprint
    exists. A model that is not an ``nn.Module`` (a plain callable) is fingerprinted by itself.

    Not covered: process-wide state baked in at capture (the TF32 setting, which picks the fp32 attention kernel;
    ``FASTDIFF_BACKEND``; ``module.training``). Change those, then ``Pipeline.disable_cuda_graph()`` and enable again.
    """
    if not isinstance(model, nn.Module):
        return (model,)
    items: list = []
    for module in model.modules():
        items.append((module, tuple(module._forward_pre_hooks), tuple(module._forward_hooks)))
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is not None:
                items.append((tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride(), tensor.device))
    return tuple(items)


class _Graph:
    """Static input buffers, the captured graph and its static output: the UNet call of one step.

    With ``capture=False`` nothing is captured and :meth:`replay` runs the same body eagerly on the static buffers.
    CPU tests use this to check what a graph would compute.
    """

    def __init__(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor],
                 capture: bool = True, *, pool=None, stream=None):
        self.model = model
        self.x, self.t = x.clone(), t.clone()
        self.labels = labels.clone() if labels is not None else None
        self.context = context.clone() if context is not None else None
        self.graph = None
        self.out: Optional[Tensor] = None
        if capture:
            self._capture(pool, stream)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _capture(self, pool, stream) -> None:
        """Warm up twice (lazy inits and autotuning happen outside the capture), then capture one call into a graph
        that draws on ``pool``. Both run on ``stream`` (a new side stream of the inputs' device when None) with that
        device current.

        The stream context is this method's own, so the previous stream is restored even if capture fails. The
        default stream waits for the warm-up before anything else runs. On failure the first exception raised
        inside the capture is re-raised (see :meth:`_record`), and ``self.graph`` stays None.
        """
        device = self.device
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device=device) if stream is None else stream
            stream.wait_stream(torch.cuda.current_stream(device))  # the static inputs are written on the default one
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._forward()
                    graph, out = self._record(pool, stream)
            finally:
                torch.cuda.current_stream(device).wait_stream(stream)
        self.graph, self.out = graph, out

    def _record(self, pool, stream):
        """Capture one call of :meth:`_forward` → (graph, static output); raises the cause of a failed capture.

        When the body raises during capture, ``capture_end`` usually raises as well ("operation failed due to a
        previous error during capture"). That second error is only a consequence, so the body's exception is
        re-raised instead. It is re-raised outside the handler, so it is not chained to ``capture_end``'s error,
        whose traceback holds the ``__exit__`` frame that holds the cause (a reference cycle). ``cause`` and ``graph``
        are also cleared in ``finally``. With no reference cycle, the failed graph (and its hold on the pool) is
        freed as soon as the caller lets go of the exception, with no wait for the cyclic garbage collector.
        """
        graph = torch.cuda.CUDAGraph()
        cause = None
        try:
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    try:
                        out = self._forward()
                    except BaseException as exc:
                        cause = exc
                        raise
            except BaseException as exc:
                if cause is None or exc is cause:
                    raise
                # else capture_end's error, a consequence of ``cause``: dropped here, ``cause`` raised below
            if cause is not None:
                raise cause
            return graph, out
        finally:
            cause = graph = None

    def _forward(self) -> Tensor:
        return self.model(self.x, self.t, class_labels=self.labels, context=self.context)

    def _load(self, x, t, labels, context) -> None:
        self.x.copy_(x)
        self.t.copy_(t)
        if labels is not None:
            self.labels.copy_(labels)
        if context is not None:
            self.context.copy_(context)

    def _play(self) -> Tensor:
        """Replay the graph and copy its output out. Uncaptured, run the same body eagerly (how CPU tests check it)."""
        if self.graph is None:
            return self._forward().clone()
        self.graph.replay()
        return self.out.clone()  # before any other graph of the shared pool replays

    def replay(self, x, t, labels, context) -> Tensor:
        self._load(x, t, labels, context)
        return self._play()


def _takes_noise(plan) -> bool:
    """Whether a step graph for ``plan`` reads a noise buffer.

    DDPM always does, so one graph serves every step: a step without noise (t = 0) fills the buffer with zeros, and
    since σ is finite, mean + σ·0 is exactly the mean. DDIM does when η > 0, which also means every one of its plans
    carries noise.
    """
    return plan.noise is not None or plan.op == "ddpm_step"


class _StepGraph(_Graph):
    """The whole step: the UNet call and the fused DDIM/DDPM update of ``plan`` (a schedulers.vp.FusedStep)."""

    def __init__(self, model, plan, guidance_scale, x, t, labels, context, sample: Tensor, capture: bool = True,
                 *, pool=None, stream=None):
        self.plan, self.guidance_scale = plan, guidance_scale
        self.sample = sample.clone()
        b = sample.shape[0]
        self.alpha_t = torch.full((b,), plan.alpha_prod_t, device=sample.device, dtype=torch.float32)
        self.alpha_prev = torch.full((b,), plan.alpha_prod_t_prev, device=sample.device, dtype=torch.float32)
        self.noise = None
        if _takes_noise(plan):
            self.noise = (plan.noise.clone(memory_format=torch.contiguous_format) if plan.noise is not None
                          else torch.zeros_like(self.sample, memory_format=torch.contiguous_format))
        super().__init__(model, x, t, labels, context, capture, pool=pool, stream=stream)

    def _forward(self) -> Tensor:
        out = super()._forward().to(self.sample.dtype)
        step = dataclasses.replace(self.plan, noise=self.noise)
        prev, _ = step.run(self.sample, out, self.guidance_scale, self.alpha_t, self.alpha_prev)
        return prev

    def replay_step(self, plan, x, t, labels, context, sample) -> Tensor:
        self._load(x, t, labels, context)
        self.sample.copy_(sample)
        self.alpha_t.fill_(plan.alpha_prod_t)
        self.alpha_prev.fill_(plan.alpha_prod_t_prev)
        if self.noise is not None:
            if plan.noise is None:
                self.noise.zero_()  # DDPM's step without noise: z = 0 gives the mean
            else:
                self.noise.copy_(plan.noise)
        return self._play()


class GraphCache:
    """An LRU of captured graphs keyed by the model and the call's shapes and dtypes. A failed capture falls back to
    eager.

    One cache owns one memory pool, shared by all its graphs, and one capture stream per device. ``captures``
    counts successful captures and ``replays`` counts graph uses (a capture's first use included). ``failures``
    counts failed captures.
    """

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: "collections.OrderedDict[tuple, _Graph]" = collections.OrderedDict()
        self._failed: set[tuple] = set()
        self._fingerprints: dict[int, tuple] = {}  # id(model) → fingerprint of its current graphs
        self._pool = None  # torch.cuda.graph_pool_handle(), made at the first capture
        self._streams: dict[torch.device, object] = {}  # device → its capture stream
        self.captures = 0
        self.replays = 0
        self.failures = 0

    def clear(self) -> None:
        """Drop every graph, failed key, fingerprint and capture stream. The pool is freed once its graphs are."""
        self._graphs.clear()
        self._failed.clear()
        self._fingerprints.clear()
        self._streams.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    # ----------------------------------------------------------------- weights
    def check(self, model) -> bool:
        """Compare ``model``'s fingerprint with the one its graphs were captured at, once per pipeline call.

        On a change, drop that model's graphs and failed keys. They are captured again at their next use. Returns
        True when something was dropped. Other models' graphs stay.
        """
        current = fingerprint(model)
        mid = id(model)
        previous = self._fingerprints.get(mid)
        if previous == current:
            return False
        dropped = previous is not None and self._drop_model(mid)
        if dropped:
            logger.info("fastdiff: the model's weights or modules changed since capture: its CUDA graphs are dropped "
                        "and will be captured again")
        self._fingerprints[mid] = current
        # forget models that own nothing here any more (their fingerprints hold them alive)
        live = {key[0] for key in itertools.chain(self._graphs, self._failed)} | {mid}
        for other in [m for m in self._fingerprints if m not in live]:
            del self._fingerprints[other]
        return dropped

    def _drop_model(self, mid: int, keep: Optional[tuple] = None) -> bool:
        """Drop the graphs (but ``keep``) and failed keys of the model with id ``mid``; True if any were there."""
        stale = [key for key in self._graphs if key[0] == mid and key != keep]
        failed = {key for key in self._failed if key[0] == mid}
        for key in stale:
            del self._graphs[key]
        self._failed -= failed
        return bool(stale or failed)

    def _captured(self, model, key: tuple) -> None:
        """After a capture: record the fingerprint the graph was captured at. If it differs from the one checked
        (say a lazy buffer made during the warm-up), the model's older graphs are stale, so drop them."""
        current = fingerprint(model)
        if self._fingerprints.get(id(model)) != current:
            self._drop_model(id(model), keep=key)
            self._fingerprints[id(model)] = current

    # ----------------------------------------------------------------- capture and lookup
    def _capture_args(self, device: torch.device) -> dict:
        """The shared pool and ``device``'s capture stream, made on first use (with ``device`` current)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = self._streams.get(device)
        if stream is None:
            with torch.cuda.device(device):
                stream = self._streams[device] = torch.cuda.Stream(device=device)
        return {"pool": self._pool, "stream": stream}

    def _get(self, model, key: tuple, device: torch.device, make: Callable[..., _Graph]) -> Optional[_Graph]:
        """The graph for ``key``, captured by ``make(pool=..., stream=...)`` on first use. None when its capture
        failed (now or before): the caller then runs eagerly."""
        if id(model) not in self._fingerprints:
            self.check(model)
        graph = self._graphs.get(key)
        if graph is None:
            if key in self._failed:
                return None
            try:
                graph = make(**self._capture_args(device))
            except Exception as exc:  # capture is an optimisation: eager always works
                # a string, not the exception: a log record holding it would keep the failed graph (and pool) alive
                cause = f"{type(exc).__name__}: {exc}"
                logger.warning("fastdiff: CUDA graph capture failed (%s); running this step eagerly", cause)
                self._failed.add(key)
                self.failures += 1
                torch.cuda.synchronize(device)  # settle the device after the failed capture, before the eager run
                return None
            self.captures += 1
            self._graphs[key] = graph
            self._captured(model, key)
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        self.replays += 1
        return graph

    @staticmethod
    def key(model, x, t, labels, context) -> tuple:
        def sig(v):
            return None if v is None else (tuple(v.shape), v.dtype, v.device)

        return (id(model), sig(x), sig(t), sig(labels), sig(context))

    def run(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor]) -> Tensor:
        """The UNet call of a step, replayed from a graph (captured on first use of these shapes). Eager for inputs
        off CUDA."""
        graph = None
        if _is_cuda(x):
            key = self.key(model, x, t, labels, context)
            graph = self._get(model, key, x.device, lambda **kw: _Graph(model, x, t, labels, context, **kw))
        if graph is None:
            return model(x, t, class_labels=labels, context=context)
        with torch.cuda.device(graph.device):
            return graph.replay(x, t, labels, context)

    def run_step(self, model, plan, guidance_scale, x: Tensor, t: Tensor, labels: Optional[Tensor],
                 context: Optional[Tensor], sample: Tensor) -> Tensor:
        """A whole DDIM/DDPM step (UNet call + fused update of ``plan``) → x_{t−1}, replayed from a graph. Eager for
        inputs off CUDA.

        The key holds ``guidance_scale`` (a Python float in the fused ops, so baked into a capture) and, for DDIM,
        whether noise is added (η > 0). DDPM's steps with and without noise share one graph (see
        :func:`_takes_noise`).
        """
        graph = None
        if _is_cuda(x) and _is_cuda(sample):
            options = tuple(sorted(plan.options.items()))
            key = (*self.key(model, x, t, labels, context), plan.op, options, guidance_scale, _takes_noise(plan),
                   tuple(sample.shape), sample.dtype)
            graph = self._get(model, key, sample.device,
                              lambda **kw: _StepGraph(model, plan, guidance_scale, x, t, labels, context, sample, **kw))
        if graph is None:
            out = model(x, t, class_labels=labels, context=context).to(sample.dtype)
            return plan.run(sample, out, guidance_scale)[0]
        with torch.cuda.device(graph.device):
            return graph.replay_step(plan, x, t, labels, context, sample)
