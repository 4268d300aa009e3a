"""CUDA-graph replay of a denoising step: one graph per (shapes, dtype, step kind), in a bounded LRU.

With a DDIM/DDPM scheduler a graph holds the whole step, the UNet call and the fused update (``ops.ddim_step`` /
``ops.ddpm_step`` with ᾱ_t and ᾱ_prev as (B,) device tensors, filled in before each replay, and the noise copied
into a static buffer); with the other schedulers it holds the UNet call and the update runs eagerly.

A graph reads the model's parameters from the memory they had at capture, so weights updated in place
(``load_state_dict`` copies into the same tensors) are used by the next replay; replacing parameter tensors
(``model.to()``, a new module) invalidates the graphs, and ``Pipeline.to`` clears the cache.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

import torch
from torch import Tensor

logger = logging.getLogger("fastdiff")


class _Graph:
    """Static input buffers, the captured graph, and its static output: the UNet call of one step."""

    def __init__(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor],
                 capture: bool = True):
        self.model = model
        self.x, self.t = x.clone(), t.clone()
        self.labels = labels.clone() if labels is not None else None
        self.context = context.clone() if context is not None else None
        self.graph = None
        if capture:
            self._capture()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (lazy inits, autotuning) outside the capture
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()

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
        """Replay the graph (or, uncaptured, run the same body eagerly: how CPU tests check it)."""
        if self.graph is None:
            return self._forward().clone()
        self.graph.replay()
        return self.out.clone()

    def replay(self, x, t, labels, context) -> Tensor:
        self._load(x, t, labels, context)
        return self._play()


class _StepGraph(_Graph):
    """The whole step: the UNet call and the fused DDIM/DDPM update of ``plan`` (a schedulers.vp.FusedStep)."""

    def __init__(self, model, plan, guidance_scale, x, t, labels, context, sample: Tensor, capture: bool = True):
        self.plan, self.guidance_scale = plan, guidance_scale
        self.sample = sample.clone()
        b = sample.shape[0]
        self.alpha_t = torch.full((b,), plan.alpha_prod_t, device=sample.device, dtype=torch.float32)
        self.alpha_prev = torch.full((b,), plan.alpha_prod_t_prev, device=sample.device, dtype=torch.float32)
        self.noise = plan.noise.clone() if plan.noise is not None else None
        super().__init__(model, x, t, labels, context, capture)

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
            self.noise.copy_(plan.noise)
        return self._play()


class GraphCache:
    """LRU of captured graphs keyed by the call's shapes and dtypes; capture failures fall back to eager."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: "collections.OrderedDict[tuple, _Graph]" = collections.OrderedDict()
        self._failed: set[tuple] = set()
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def key(model, x, t, labels, context) -> tuple:
        def sig(v):
            return None if v is None else (tuple(v.shape), v.dtype, v.device)

        return (id(model), sig(x), sig(t), sig(labels), sig(context))

    def _get(self, key: tuple, make):
        graph = self._graphs.get(key)
        if graph is None and key not in self._failed:
            try:
                graph = make()
                self.captures += 1
            except Exception as exc:  # capture is an optimisation: eager always works
                logger.warning("fastdiff: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)
                self._failed.add(key)
                torch.cuda.synchronize()
                return None
            self._graphs[key] = graph
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        if graph is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
        return graph

    def run(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor]) -> Tensor:
        """The UNet call of a step, replayed from a graph (captured on first use of these shapes)."""
        key = self.key(model, x, t, labels, context)
        graph = self._get(key, lambda: _Graph(model, x, t, labels, context))
        if graph is None:
            return model(x, t, class_labels=labels, context=context)
        return graph.replay(x, t, labels, context)

    def run_step(self, model, plan, guidance_scale, x: Tensor, t: Tensor, labels: Optional[Tensor],
                 context: Optional[Tensor], sample: Tensor) -> Tensor:
        """A whole DDIM/DDPM step (UNet call + fused update of ``plan``) → x_{t−1}, replayed from a graph."""
        options = tuple(sorted(plan.options.items()))
        key = (*self.key(model, x, t, labels, context), plan.op, options, guidance_scale, plan.noise is not None,
               tuple(sample.shape), sample.dtype)
        graph = self._get(key, lambda: _StepGraph(model, plan, guidance_scale, x, t, labels, context, sample))
        if graph is None:
            out = model(x, t, class_labels=labels, context=context).to(sample.dtype)
            return plan.run(sample, out, guidance_scale)[0]
        return graph.replay_step(plan, x, t, labels, context, sample)
