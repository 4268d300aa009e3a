"""What every pipeline shares: components, ``to()``, saving/loading a pipeline folder, output conversion, the
denoising loop (with classifier-free guidance batched as [uncond; cond]) and the NaN/Inf guard.

A pipeline folder holds ``model_index.json`` (the pipeline class, its settings and one entry per component) and
one subfolder per component: a fastdiff model checkpoint (``config.json`` + ``model.safetensors``) or a
scheduler (``scheduler_config.json``).
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.files import read_json_object, write_atomic, write_json_atomic
from fastdiff.validation import check_positive_int

logger = logging.getLogger("fastdiff")

INDEX_NAME = "model_index.json"
OUTPUT_TYPES = ("pil", "np", "pt")

PathLike = Union[str, os.PathLike]
GeneratorArg = Union[None, int, torch.Generator, Sequence[torch.Generator]]


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared in the latents during sampling (the message names the step)."""


def make_generator(generator: GeneratorArg, device: torch.device):
    """An int seeds a fresh CPU generator (so a seed gives the same images on every device); others pass through."""
    if generator is None or isinstance(generator, torch.Generator) or isinstance(generator, (list, tuple)):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator("cpu").manual_seed(int(generator))
    raise TypeError(f"generator must be None, an int seed, a torch.Generator or a list of them, got "
                    f"{type(generator).__name__}")


def to_output(images: Tensor, output_type: str):
    """(B, C, H, W) in [−1, 1] → PIL images (a list), a (B, H, W, C) float32 array in [0, 1], or a (B, C, H, W)
    float32 CPU tensor in [0, 1]."""
    images = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    pixels = (array * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def save_grid(images, path: PathLike, nrow: Optional[int] = None, pad: int = 2, scale: int = 1) -> None:
    """Write a list of equally sized PIL images (or a (B, H, W, C) array in [0, 1]) as one PNG grid.

    The file is written to a temporary name next to ``path`` and renamed, so a failure never leaves a broken PNG.
    """
    from PIL import Image

    if isinstance(images, np.ndarray):
        images = to_output(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, "pil")
    images = list(images)
    if not images:
        raise ValueError("images must not be empty")
    n = len(images)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new(images[0].mode, (nrow * (w + pad) + pad, ncol * (h + pad) + pad), color=0)
    for i, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        grid.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


class Pipeline:
    """Base class. Subclasses list their components in ``component_names`` and their settings in ``settings``."""

    component_names: tuple[str, ...] = ()

    def __init__(self, **components):
        for name in self.component_names:
            setattr(self, name, components.get(name))
        self.settings: dict[str, Any] = {}
        self._cuda_graphs = None
        self._compiled = None
        self._channels_last = False

    # ----------------------------------------------------------------- devices and dtypes
    def modules(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in self.component_names if isinstance(getattr(self, n, None), nn.Module)}

    @property
    def device(self) -> torch.device:
        for m in self.modules().values():
            for p in m.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for m in self.modules().values():
            for p in m.parameters():
                return p.dtype
        return torch.float32

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        """Move every model to ``device`` and/or cast it to ``dtype`` (fp32/fp16/bf16); returns self.

        On CPU, sampling switches convolutional models to channels_last (see :meth:`_prefer_channels_last`).
        CUDA graphs (:meth:`enable_cuda_graph`) read the weights and inputs at their old addresses. A move or cast
        on CUDA empties the graph cache, so the graphs are captured again. A move off CUDA drops the cache, because
        graphs exist only on CUDA: call :meth:`enable_cuda_graph` again after moving back.
        """
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("device='cuda' requested but CUDA is not available")
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
            m.eval()
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()  # the graphs read the old addresses
            if self.device.type != "cuda":
                logger.info("fastdiff: CUDA graphs dropped: the pipeline moved to %s (call enable_cuda_graph() "
                            "again on CUDA)", self.device)
                self._cuda_graphs = None
        self._channels_last = False
        return self

    def _prefer_channels_last(self) -> None:
        """On CPU, switch convolutional models to channels_last once (in place): measured 4–6% faster per UNet
        forward here (the digits UNet and a 6.5M-parameter UNet, fp32, one thread). GPUs keep their layout."""
        if self._channels_last or self.device.type != "cpu":
            return
        for m in self.modules().values():
            if any(isinstance(c, nn.Conv2d) for c in m.modules()):
                m.to(memory_format=torch.channels_last)
        self._channels_last = True

    # ----------------------------------------------------------------- saving and loading
    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``model_index.json`` and one subfolder per component."""
        os.makedirs(save_directory, exist_ok=True)
        from fastdiff._version import __version__

        index: dict[str, Any] = {"_class_name": type(self).__name__, "_fastdiff_version": __version__,
                                 "settings": self.settings}
        for name in self.component_names:
            component = getattr(self, name)
            if component is None:
                index[name] = None
                continue
            sub = os.path.join(save_directory, name)
            if hasattr(component, "save_pretrained"):
                component.save_pretrained(sub)
            else:
                component.save_config(sub)
            index[name] = ["fastdiff", type(component).__name__]
        write_json_atomic(os.path.join(save_directory, INDEX_NAME), index)

    @classmethod
    def from_pretrained(cls, path: PathLike, device=None, dtype: Optional[torch.dtype] = None) -> "Pipeline":
        """Load a pipeline folder written by :meth:`save_pretrained` (any pipeline class: model_index.json says)."""
        return load_pipeline(path, device=device, dtype=dtype, expected=cls)

    # ----------------------------------------------------------------- CUDA graphs
    def enable_cuda_graph(self, max_graphs: int = 8):
        """Capture one denoising step per (shape, dtype) in a CUDA graph and replay it (an LRU of ``max_graphs``, all
        in one memory pool); see :mod:`fastdiff.pipelines.cuda_graph`.

        Weights updated in place (``load_state_dict`` into the same tensors) are seen by the next replay. Weights
        replaced (``.half()``, ``load_state_dict(assign=True)``, an adapter module or hook) are noticed at the next
        call, and that model's graphs are captured again. With DDIM/DDPM each guidance scale gets its own graph: the
        fused step takes the scale as a Python float. On a CPU pipeline this does nothing but log a line, and
        :meth:`to` a non-CUDA device turns the graphs off. Returns self.
        """
        max_graphs = check_positive_int("max_graphs", max_graphs)
        if self.device.type != "cuda":
            logger.info("fastdiff: enable_cuda_graph ignored: the pipeline is on %s, CUDA graphs need CUDA",
                        self.device)
            self._cuda_graphs = None
            return self
        from fastdiff.pipelines.cuda_graph import GraphCache

        if self._compiled is not None:
            logger.info("fastdiff: compile() turned off: enable_cuda_graph() replaces it")
            self._compiled = None
        self._cuda_graphs = GraphCache(max_graphs)
        return self

    def disable_cuda_graph(self):
        """Drop the captured graphs (their memory pool is freed with them) and sample eagerly again. Returns self."""
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()
        self._cuda_graphs = None
        return self

    # ----------------------------------------------------------------- torch.compile
    def compile(self, *, freeze: bool = True, mode: Optional[str] = None, dynamic: Optional[bool] = False,
                fullgraph: bool = False, backend: str = "inductor"):
        """Sample with the denoiser compiled by torch.compile (opt-in: the first call of each shape compiles, tens of
        seconds on a CPU); see :mod:`fastdiff.pipelines.compiled`. Returns self.

        Args:
            freeze: inductor freezing, the weights folded into the compiled code as constants (prepacked convolution
                weights on a CPU); weights changed later are noticed at the next call, which compiles again.
            mode: torch.compile's mode (None, "default", "reduce-overhead" — CUDA graphs on CUDA —, "max-autotune",
                "max-autotune-no-cudagraphs").
            dynamic: torch.compile's ``dynamic`` (False: one compile per batch size and image size).
            fullgraph: fail instead of splitting the model into several graphs.
            backend: a torch.compile backend ("inductor"; tests use "aot_eager").
        Raises:
            TypeError/ValueError naming the argument. Turns :meth:`enable_cuda_graph` off (a compile with
            mode="reduce-overhead" is the compiled way to CUDA graphs).
        """
        from fastdiff.pipelines.compiled import CompiledModel

        compiled = CompiledModel(freeze=freeze, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        if self._cuda_graphs is not None:
            logger.info("fastdiff: CUDA graphs turned off: compile() replaces them")
            self.disable_cuda_graph()
        self._compiled = compiled
        return self

    def disable_compile(self):
        """Sample with the eager denoiser again. Returns self."""
        self._compiled = None
        return self

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={type(getattr(self, n)).__name__}" for n in self.component_names)
        return f"{type(self).__name__}({parts})"


def load_pipeline(path: PathLike, device=None, dtype=None, expected: Optional[type] = None) -> Pipeline:
    """Build the pipeline saved in folder ``path`` (see :meth:`Pipeline.save_pretrained`)."""
    from fastdiff import pipelines, schedulers
    from fastdiff.models import load_model

    path = Path(path)
    index_file = path / INDEX_NAME
    index = read_json_object(index_file, missing=f"not a fastdiff pipeline folder (no {INDEX_NAME})")
    class_name = index.get("_class_name")
    cls = getattr(pipelines, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise ValueError(f"{index_file}: unknown pipeline class {class_name!r}")
    if expected is not None and expected is not Pipeline and not issubclass(cls, expected):
        raise ValueError(f"{index_file}: holds a {class_name}, not a {expected.__name__}")
    components = {}
    for name in cls.component_names:
        entry = index.get(name)
        if entry is None:
            components[name] = None
            continue
        sub = path / name
        if (sub / "scheduler_config.json").is_file():
            sched_cls = getattr(schedulers, entry[1], None)
            if sched_cls is None:
                raise ValueError(f"{index_file}: unknown scheduler class {entry[1]!r}")
            components[name] = sched_cls.from_config(sub)
        elif entry[1] == "WordTokenizer":
            from fastdiff.models.text_encoder import WordTokenizer

            components[name] = WordTokenizer.from_pretrained(sub)
        else:
            components[name] = load_model(sub)
    settings = dict(index.get("settings", {}))
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**components, **{k: v for k, v in settings.items() if k in accepted})
    pipe.settings.update(settings)  # descriptive settings (defaults for the CLI, description) ride along
    if device is not None or dtype is not None:
        pipe.to(device, dtype)
    return pipe
