"""CUDA-graph replay of the UNet call of a denoising step: one graph per (shapes, dtype), in a bounded LRU.

A graph reads the model's parameters from the memory they had at capture, so weights updated in place
(``load_state_dict`` copies into the same tensors) are used by the next replay; replacing parameter tensors
(``model.to()``, a new module) invalidates the graphs, and ``Pipeline.to`` clears the cache.
"""

from __future__ import annotations

import collections
import logging
from typing import Optional

import torch
from torch import Tensor

logger = logging.getLogger("fastdiff")


class _Graph:
    """Static input buffers, the captured graph, and its static output."""

    def __init__(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor]):
        self.x, self.t = x.clone(), t.clone()
        self.labels = labels.clone() if labels is not None else None
        self.context = context.clone() if context is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (lazy inits, autotuning) outside the capture
            for _ in range(2):
                self._forward(model)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward(model)

    def _forward(self, model) -> Tensor:
        return model(self.x, self.t, class_labels=self.labels, context=self.context)

    def replay(self, x, t, labels, context) -> Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        if labels is not None:
            self.labels.copy_(labels)
        if context is not None:
            self.context.copy_(context)
        self.graph.replay()
        return self.out.clone()


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

    def run(self, model, x: Tensor, t: Tensor, labels: Optional[Tensor], context: Optional[Tensor]) -> Tensor:
        key = self.key(model, x, t, labels, context)
        graph = self._graphs.get(key)
        if graph is None and key not in self._failed:
            try:
                graph = _Graph(model, x, t, labels, context)
                self.captures += 1
            except Exception as exc:  # capture is an optimisation: eager always works
                logger.warning("fastdiff: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)
                self._failed.add(key)
                torch.cuda.synchronize()
            else:
                self._graphs[key] = graph
                if len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
        if graph is None:
            return model(x, t, class_labels=labels, context=context)
        self._graphs.move_to_end(key)
        self.replays += 1
        return graph.replay(x, t, labels, context)
