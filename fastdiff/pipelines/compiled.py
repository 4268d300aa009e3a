"""torch.compile of a pipeline's denoiser for inference (:meth:`fastdiff.pipelines.DiffusionPipeline.compile`).

Opt-in: the first call of each shape compiles (tens of seconds on a CPU; inductor caches the result on disk, so a
later process compiles faster). fastdiff's ops stay visible to the compiler: on the CPU their reference code is
traced for inductor to fuse, on CUDA their Triton kernels are (fastdiff/ops.py, "torch.compile").

``freeze=True`` (the default) turns on inductor's freezing for these compiles: the weights become constants of the
compiled code, so inductor folds them (the convolutions' weights prepacked for oneDNN on a CPU, the time and class
embeddings' constant parts computed once). Frozen weights are copies: :class:`CompiledModel` fingerprints the model
(every parameter's and buffer's storage, layout and in-place version counter, and its modules and hooks) once per
pipeline call and compiles again when any of these changed. Each new compile first drops torch.compile's cached code
for the model's ``forward`` (its guards do not cover inductor's settings, so code compiled with other settings or on
other frozen weights would be reused); that cache is shared by every instance of the class in the process, which
then compile again too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Optional

import torch
from torch import nn

from fastdiff.pipelines.cuda_graph import fingerprint
from fastdiff.validation import check_bool, check_choice

logger = logging.getLogger("fastdiff")

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def weights_fingerprint(model: nn.Module) -> tuple:
    """:func:`fastdiff.pipelines.cuda_graph.fingerprint` plus every parameter's and buffer's in-place version (a
    ``load_state_dict`` into the same tensors changes it): what frozen weights depend on."""
    versions = tuple(t._version for m in model.modules()
                     for t in itertools.chain(m._parameters.values(), m._buffers.values()) if t is not None)
    return fingerprint(model), versions


class CompiledModel:
    """A model's torch.compile, compiled again when its weights change under ``freeze``."""

    def __init__(self, *, freeze: bool = True, backend: str = "inductor", mode: Optional[str] = None,
                 dynamic: Optional[bool] = False, fullgraph: bool = False):
        freeze, fullgraph = check_bool("freeze", freeze), check_bool("fullgraph", fullgraph)
        if not isinstance(backend, str) or not backend:
            raise TypeError(f"backend must be a torch.compile backend name (a str), got {backend!r}")
        check_choice("mode", mode, MODES)
        dynamic = None if dynamic is None else check_bool("dynamic", dynamic)
        self.freeze, self.backend, self.mode, self.dynamic, self.fullgraph = freeze, backend, mode, dynamic, fullgraph
        self._model: Optional[nn.Module] = None
        self._fn = None
        self._fingerprint = None
        self.compiles = 0  # how many times a torch.compile was set up (tests and logs)

    def check(self, model: nn.Module) -> None:
        """Once per pipeline call: (re)create the compiled callable for ``model`` if it is new or, with freezing, if
        its weights changed since."""
        fp = weights_fingerprint(model) if self.freeze else None
        if self._fn is not None and model is self._model and fp == self._fingerprint:
            return
        if self._fn is not None and self.freeze:
            logger.info("fastdiff: the model's weights changed since they were frozen into the compiled code: "
                        "compiling again")
        # torch.compile keeps compiled code per code object, and its guards do not include inductor's settings: code
        # compiled for this forward under other settings (with or without freezing, frozen on other weights) would
        # be reused, so it is dropped first
        torch._dynamo.reset_code(type(model).forward.__code__)
        options = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": self.fullgraph}
        if self.mode is not None and self.backend == "inductor":
            options["mode"] = self.mode
        self._fn = torch.compile(model, **options)
        self._model, self._fingerprint = model, fp
        self.compiles += 1

    def _settings(self):
        if self.backend != "inductor":
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=self.freeze)

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            raise RuntimeError("CompiledModel.check(model) must run before the first call")
        with self._settings():
            return self._fn(*args, **kwargs)
