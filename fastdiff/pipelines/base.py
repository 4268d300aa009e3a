"""What every pipeline shares: components, ``to()``, saving/loading a pipeline folder, output conversion, the
denoising loop (with classifier-free guidance batched as [uncond; cond]) and the NaN/Inf guard.

A pipeline folder holds ``model_index.json`` (the pipeline class, its settings and one entry per component) and
one subfolder per component: a fastdiff model checkpoint (``config.json`` + ``model.safetensors``) or a
scheduler (``scheduler_config.json``).

An extension folder (:func:`save_extension`) ships what a model adds to a base model, e.g. a ControlNet::

    digits-controlnet/
        model_index.json   {"_class_name": "TextToImagePipeline", "_fastdiff_version": "...",
                            "base_model": "digits-sd", "settings": {...}, "controlnet": ["fastdiff", "ControlNet"]}
        controlnet/        config.json + model.safetensors

:func:`load_pipeline` loads the base model first (``base_model``: a folder relative to the extension folder, or an
absolute one, holding a model_index.json; else a shipped model's name), sets the folder's components on it and
updates its settings with the folder's (the base's kept otherwise).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import numbers
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.files import read_json_object, write_atomic, write_json_atomic
from fastdiff.integrity import verify_folder
from fastdiff.validation import check_positive_int

logger = logging.getLogger("fastdiff")

INDEX_NAME = "model_index.json"
OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_STEPS = 25  # sampler steps when neither the caller nor the model's settings say (fastdiff.hub re-exports it)
MAX_BASE_DEPTH = 8  # extension folders on extension folders: at most this many base_model links

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
    """Base class. Subclasses list their components in ``component_names`` and their settings in ``settings``.

    Threads: a pipeline object may be shared between threads. Its calls are serialised (one at a time per pipeline
    object, a re-entrant lock taken by every subclass's ``__call__``), because a call keeps per-call state in the
    pipeline and its scheduler (timesteps, the control map, the image prompt); so each call gives the images it gives
    alone. For sampling in parallel, give each thread its own pipeline.
    """

    component_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "_serialised", False):

            @functools.wraps(call)
            def serialised(self, *args, **kw):
                with self.__dict__.setdefault("_call_lock", threading.RLock()):
                    return call(self, *args, **kw)

            serialised._serialised = True
            cls.__call__ = serialised

    def __init__(self, **components):
        for name in self.component_names:
            setattr(self, name, components.get(name))
        self.settings: dict[str, Any] = {}
        self._cuda_graphs = None
        self._compiled = None
        self._channels_last = False
        self._call_lock = threading.RLock()  # see the class docstring: calls are serialised

    def __getstate__(self):  # copy / deepcopy / pickle: a lock is not copied, the copy gets its own
        state = self.__dict__.copy()
        state.pop("_call_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._call_lock = threading.RLock()

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
    def from_pretrained(cls, path: PathLike, device=None, dtype: Optional[torch.dtype] = None,
                        allow_non_finite: Optional[bool] = None) -> "Pipeline":
        """Load a pipeline folder written by :meth:`save_pretrained` (any pipeline class: model_index.json says);
        ``allow_non_finite`` as :func:`load_pipeline`."""
        return load_pipeline(path, device=device, dtype=dtype, expected=cls, allow_non_finite=allow_non_finite)

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

    def _check_components(self) -> None:
        """Check the components together after some were set on a built pipeline (an extension folder's, see
        :func:`load_pipeline`); raises ValueError / TypeError. Subclasses with optional components override it."""

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={type(getattr(self, n)).__name__}" for n in self.component_names)
        return f"{type(self).__name__}({parts})"


def _pipeline_class(name, where: str) -> type:
    from fastdiff import pipelines

    cls = getattr(pipelines, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise ValueError(f"{where}: unknown pipeline class {name!r}")
    return cls


def _load_component(path: Path, index_file: Path, name: str, entry):
    """The component ``name`` saved in ``path / name`` (``entry``: its model_index.json entry, not None)."""
    from fastdiff import schedulers
    from fastdiff.models import load_model

    sub = path / name
    if (sub / "scheduler_config.json").is_file():
        sched_cls = getattr(schedulers, entry[1], None)
        if sched_cls is None:
            raise ValueError(f"{index_file}: unknown scheduler class {entry[1]!r}")
        return sched_cls.from_config(sub)
    if entry[1] == "WordTokenizer":
        from fastdiff.models.text_encoder import WordTokenizer

        return WordTokenizer.from_pretrained(sub)
    return load_model(sub)


def base_model_path(folder: PathLike, base_model) -> Path:
    """The folder of an extension folder's ``base_model``: ``folder / base_model`` (an absolute path stays itself;
    ".." also lexically, for a folder not made yet) if it holds a model_index.json, else the shipped model of that
    name (fastdiff.list_models()). The current directory plays no part. ValueError naming base_model otherwise."""
    folder = Path(folder)
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError(f"{folder / INDEX_NAME}: base_model must be a shipped model's name or a pipeline folder "
                         f"(relative to {str(folder)!r}), got {base_model!r}")
    # folder / base_model as the OS resolves it, then with ".." taken lexically (for a folder not made yet)
    for candidate in (folder / base_model, Path(os.path.normpath(folder / base_model))):
        if (candidate / INDEX_NAME).is_file():
            return candidate
    from fastdiff.assets import ASSETS, list_models

    if base_model in list_models():
        return ASSETS / base_model
    raise ValueError(f"{folder / INDEX_NAME}: base_model {base_model!r} is neither a shipped model "
                     f"({', '.join(list_models()) or 'none'}) nor a pipeline folder (with {INDEX_NAME}) relative to "
                     f"{str(folder)!r}")


def _base_chain(path: Path, index_file: Path, base_model, chain: tuple) -> tuple[Path, tuple]:
    """The base model's folder and the chain of folders followed so far (a loop or a too long chain: ValueError)."""
    chain = (*chain, path.resolve())
    base = base_model_path(path, base_model)
    if base.resolve() in chain:
        steps = " → ".join(str(p) for p in (*chain, base.resolve()))
        raise ValueError(f"{index_file}: base_model {base_model!r} loops back to a folder already on the way ({steps})")
    if len(chain) > MAX_BASE_DEPTH:
        raise ValueError(f"{index_file}: more than {MAX_BASE_DEPTH} base_model links in a row")
    return base, chain


def pipeline_settings(path: PathLike, _chain: tuple = ()) -> dict:
    """The settings a pipeline folder loads with: its model_index.json's ``settings``, over its base model's for an
    extension folder."""
    path = Path(path)
    index_file = path / INDEX_NAME
    index = read_json_object(index_file, missing=f"not a fastdiff pipeline folder (no {INDEX_NAME})")
    settings = {}
    if "base_model" in index:
        base, chain = _base_chain(path, index_file, index["base_model"], _chain)
        settings = pipeline_settings(base, chain)
    settings.update(index.get("settings") or {})
    return settings


def load_pipeline(path: PathLike, device=None, dtype=None, expected: Optional[type] = None,
                  allow_non_finite: Optional[bool] = None, _chain: tuple = ()) -> Pipeline:
    """Build the pipeline saved in folder ``path`` (see :meth:`Pipeline.save_pretrained`), or the base model of an
    extension folder (``base_model`` in its model_index.json, see :func:`save_extension`) with the folder's
    components set on it and its settings updated with the folder's.

    A folder with a ``checksums.json`` (every shipped and every trained one) has its weight files checked against it
    first (:func:`fastdiff.integrity.verify_folder`: a CorruptedModelError, a ValueError, names a damaged file).
    Weights holding NaN/Inf are refused (ValueError naming the tensor) unless ``allow_non_finite=True``."""
    from fastdiff.models.modeling import allow_non_finite_weights

    verify_folder(path)
    with allow_non_finite_weights(allow_non_finite):
        return _load_pipeline(Path(path), device, dtype, expected, _chain)


def _load_pipeline(path: Path, device, dtype, expected: Optional[type], _chain: tuple) -> Pipeline:
    index_file = path / INDEX_NAME
    index = read_json_object(index_file, missing=f"not a fastdiff pipeline folder (no {INDEX_NAME})")
    class_name = index.get("_class_name")
    cls = _pipeline_class(class_name, str(index_file))
    if expected is not None and expected is not Pipeline and not issubclass(cls, expected):
        raise ValueError(f"{index_file}: holds a {class_name}, not a {expected.__name__}")
    settings = index.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{index_file}: settings must be a JSON object, got {type(settings).__name__}")
    if "base_model" in index:
        base, chain = _base_chain(path, index_file, index["base_model"], _chain)
        verify_folder(base)
        pipe = _load_pipeline(base, None, None, None, chain)
        if not isinstance(pipe, cls):
            raise ValueError(f"{index_file}: a {class_name} extension, but its base_model {index['base_model']!r} is a "
                             f"{type(pipe).__name__}")
        for name in cls.component_names:
            entry = index.get(name)
            if entry is not None:
                setattr(pipe, name, _load_component(path, index_file, name, entry))
        pipe._check_components()
        pipe.settings.update(settings)
    else:
        components = {}
        for name in cls.component_names:
            entry = index.get(name)
            components[name] = None if entry is None else _load_component(path, index_file, name, entry)
        accepted = inspect.signature(cls.__init__).parameters
        pipe = cls(**components, **{k: v for k, v in settings.items() if k in accepted})
        pipe.settings.update(settings)  # descriptive settings (defaults for the CLI, description) ride along
    if device is not None or dtype is not None:
        pipe.to(device, dtype)
    return pipe


def save_extension(save_directory: PathLike, base_model: str, components: Mapping[str, Any], *,
                   settings: Optional[Mapping[str, Any]] = None,
                   pipeline_class: Union[str, type] = "TextToImagePipeline") -> Path:
    """Write an extension folder: ``components`` (name → model, e.g. ``{"controlnet": controlnet}``) that
    ``base_model`` gets when the folder is loaded (:func:`load_pipeline`, ``fastdiff.load``), and nothing else::

        save_directory/model_index.json   {"_class_name": <pipeline_class>, "_fastdiff_version": ...,
                                           "base_model": base_model, "settings": settings, "controlnet":
                                           ["fastdiff", "ControlNet"]}
        save_directory/controlnet/        config.json + model.safetensors (the model's save_pretrained)

    ``base_model``: a shipped model's name ("digits-sd") or a pipeline folder relative to ``save_directory`` (or
    absolute); it must exist now, hold a ``pipeline_class`` pipeline and not be ``save_directory`` itself (nor lead
    back to it). ``settings``: JSON values updating the base's on load (e.g. ``description``,
    ``default_controlnet_conditioning_scale``). Files already in the folder are left; the index is written last.
    Returns the folder. Raises TypeError / ValueError naming the argument, before anything is written.
    """
    from fastdiff._version import __version__

    folder = Path(save_directory)
    cls = (_pipeline_class(pipeline_class, "pipeline_class") if isinstance(pipeline_class, str)
           else pipeline_class)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise TypeError(f"pipeline_class must be a Pipeline class or its name, got {pipeline_class!r}")
    if not isinstance(base_model, str) or not base_model.strip():
        raise TypeError(f"base_model must be a shipped model's name or a folder path (a non-empty str), got "
                        f"{base_model!r}")
    if not isinstance(components, Mapping) or not components:
        raise TypeError(f"components must be a non-empty dict of component name → model, got {components!r}")
    for name, component in components.items():
        if name not in cls.component_names:
            raise ValueError(f"components: {name!r} is not a component of a {cls.__name__} "
                             f"({', '.join(cls.component_names)})")
        if not (hasattr(component, "save_pretrained") or hasattr(component, "save_config")):
            raise TypeError(f"components[{name!r}] must be a fastdiff model or scheduler, got "
                            f"{type(component).__name__}")
    settings = {} if settings is None else settings
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    settings = dict(settings)
    try:
        json.dumps(settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"settings must hold JSON values: {exc}") from None
    base = base_model_path(folder, base_model)  # ValueError if it is nowhere
    if base.resolve() == folder.resolve():
        raise ValueError(f"base_model {base_model!r} is the folder {str(folder)!r} itself")
    base_index = read_json_object(base / INDEX_NAME)
    base_cls = _pipeline_class(base_index.get("_class_name"), str(base / INDEX_NAME))
    if not issubclass(base_cls, cls):
        raise ValueError(f"base_model {base_model!r} holds a {base_cls.__name__}, not a {cls.__name__}")
    if "base_model" in base_index:  # an extension of an extension: it must not lead back here
        _base_chain(base, base / INDEX_NAME, base_index["base_model"], (folder.resolve(),))
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": cls.__name__, "_fastdiff_version": __version__, "base_model": base_model,
                             "settings": settings}
    for name, component in components.items():
        if hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name)
        else:
            component.save_config(folder / name)
        index[name] = ["fastdiff", type(component).__name__]
    write_json_atomic(folder / INDEX_NAME, index)
    return folder
