"""What every scheduler shares: the Scheduler base class (construction from config keywords, β/ᾱ tables,
from_config and save_config), the step output, the checks of step() and add_noise() inputs, classifier-free guidance,
and noise drawn exactly as diffusers draws it.

The config lives in :mod:`fastdiff.schedulers.config`, the β/timestep/σ schedules in
:mod:`fastdiff.schedulers.schedules`, the DDPM/DDIM family in :mod:`fastdiff.schedulers.vp` and the σ-space family
(DPM-Solver, Euler) in :mod:`fastdiff.schedulers.sigma`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff import reference
from fastdiff.files import write_json_atomic
from fastdiff.schedulers.config import (
    CONFIG_NAME,
    ConfigDict,
    SchedulerConfig,
    _rebuild_config,  # noqa: F401  (pickles of configs made before the split)
    config_dict,
    load_config_mapping,
    split_config,
)
from fastdiff.schedulers.schedules import check_num_inference_steps, check_steps_offset, make_betas, spaced_timesteps
from fastdiff.validation import check_int, check_real

Generator = torch.Generator | Sequence[torch.Generator] | None


class TimestepsNotSetError(RuntimeError, ValueError):
    """step() (or scale_model_input) before set_timesteps(); both a RuntimeError and, as in diffusers, a ValueError."""


# --------------------------------------------------------------------------------------------- step inputs
def check_step_inputs(model_output, sample, guidance_scale) -> None:
    """Tensors; model_output shaped like sample, or (2B, ...) = [uncond; cond] when guidance_scale is given."""
    for name, t in (("model_output", model_output), ("sample", sample)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    expected = tuple(sample.shape) if guidance_scale is None else (2 * sample.shape[0], *sample.shape[1:])
    if tuple(model_output.shape) != expected:
        what = "sample's shape" if guidance_scale is None else "(2B, ...) = [uncond; cond] with guidance_scale"
        raise ValueError(f"model_output must have {what} {expected}, got {tuple(model_output.shape)}")


def guided_model_output(model_output: Tensor, sample: Tensor, guidance_scale: float | None) -> Tensor:
    """Classifier-free guidance in torch (Ho & Salimans 2022, eq. 6): [uncond; cond] → uncond + s·(cond − uncond)."""
    check_step_inputs(model_output, sample, guidance_scale)
    if guidance_scale is None:
        return model_output
    return reference.classifier_free_guidance(model_output, check_real("guidance_scale", guidance_scale))


def check_add_noise(original_samples, noise) -> None:
    for name, t in (("original_samples", original_samples), ("noise", noise)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}")
    if noise.shape != original_samples.shape:
        raise ValueError(f"noise must have original_samples' shape {tuple(original_samples.shape)}, "
                         f"got {tuple(noise.shape)}")


def as_float(timestep) -> float:
    """A timestep given as a number or a one-element tensor, as a Python number."""
    if isinstance(timestep, Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
        return timestep.item()
    if isinstance(timestep, (bool, np.bool_)) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be a number or a scalar tensor, got {type(timestep).__name__}")
    return timestep


def broadcast_to(values: Tensor, x: Tensor) -> Tensor:
    """(B,) per-sample values → (B, 1, ..., 1) to scale a (B, ...) tensor."""
    values = values.flatten()
    return values.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------- noise
def randn_tensor(shape, generator: Generator = None, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """z ~ N(0, I) drawn as diffusers draws it, so one seed gives the same sample in both libraries.

    A CPU generator draws on the CPU and the result moves to ``device``; a list of generators draws one batch row
    each (rows of shape (1, ...)).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    generators = list(generator) if isinstance(generator, (list, tuple)) else None
    if generators is not None and len(generators) == 1:
        generator, generators = generators[0], None
    first = generators[0] if generators else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator is on {first.device} but the noise is needed on {device}")
        draw_device = torch.device("cpu")
    if generators is not None:
        if len(generators) != shape[0]:
            raise ValueError(f"generator is a list of {len(generators)} but the batch has {shape[0]} samples")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generators]
        return _to_device(torch.cat(rows), device)
    return _to_device(torch.randn(shape, generator=generator, device=draw_device, dtype=dtype), device)


def _to_device(noise: Tensor, device: torch.device) -> Tensor:
    """Noise drawn on the CPU, moved to ``device``. To a GPU through pinned memory, without blocking: a plain copy
    from pageable memory makes the host wait for the GPU queue to drain at every sampler step."""
    if device.type == "cuda" and noise.device.type == "cpu":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def randn_like(like: Tensor, generator: Generator = None) -> Tensor:
    """z ~ N(0, I) of ``like``'s shape, device and dtype, drawn as :func:`randn_tensor` draws it."""
    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------- output
class SchedulerOutput(OrderedDict):
    """What step() returns: x_{t−1} (``prev_sample``, the next model input) and the model's estimate of x0
    (``pred_original_sample``, None where a step has none).

    Shaped like diffusers' outputs: an ordered mapping of the fields that are not None (``out["prev_sample"]``,
    ``out.keys()``, ``out.values()``, ``out.items()``, ``dict(out)``), with the fields as attributes
    (``out.prev_sample``), indexable by position over the fields that are not None (``out[0]``, ``out[:1]``), and
    ``to_tuple()``. Like diffusers', unpacking it gives its keys, not its tensors (use ``to_tuple()``), and it
    refuses ``pop``, ``update``, ``setdefault`` and ``del``.
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("prev_sample", "pred_original_sample")

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.FIELDS)} fields {self.FIELDS}")
        values = dict(zip(self.FIELDS, args))
        for key, value in kwargs.items():
            if key not in self.FIELDS or key in values:
                raise TypeError(f"{type(self).__name__} got an unexpected or repeated field {key!r}")
            values[key] = value
        for name in self.FIELDS:
            setattr(self, name, values.get(name))

    def __setattr__(self, name, value) -> None:
        if name in self.FIELDS and value is not None:
            OrderedDict.__setitem__(self, name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        if key not in self.FIELDS:
            raise KeyError(f"{type(self).__name__} has the fields {self.FIELDS}, not {key!r}")
        OrderedDict.__setitem__(self, key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        """``out["prev_sample"]`` by name, ``out[0]`` / ``out[:1]`` by position among the fields not None."""
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only: it does not support this operation")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def __reduce__(self):
        return type(self), tuple(getattr(self, name) for name in self.FIELDS)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({fields})"

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order."""
        return tuple(OrderedDict.values(self))


def step_output(prev_sample: Tensor, pred_original_sample: Tensor | None, return_dict: bool):
    """What step() returns: a SchedulerOutput, or with return_dict=False the tuple (prev_sample,
    pred_original_sample)."""
    if not return_dict:
        return prev_sample, pred_original_sample
    return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# --------------------------------------------------------------------------------------------- the step counter
class StepCounter:
    """diffusers' step counter, for schedulers whose step() reads its place in ``timesteps`` from a counter rather
    than from the timestep's value (σ-space and multistep solvers, LCM): it starts at the index of the first timestep
    passed to step() (or at ``set_begin_index``) and advances by one per step. The scheduler keeps
    ``self._timestep_list`` (its timesteps as Python numbers) and resets ``_step_index`` / ``_begin_index`` to None in
    set_timesteps.
    """

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index of the current step in ``timesteps``; None until the first step (diffusers' name)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` (pipelines that start mid-schedule, e.g. image-to-image)."""
        self._begin_index = check_int("begin_index", begin_index, minimum=0)

    def index_for_timestep(self, timestep, schedule_timesteps: Sequence[float] | None = None) -> int:
        """Position of ``timestep`` in the schedule; of two equal entries the second, so that a run starting mid-way
        does not skip a σ (diffusers' rule)."""
        value = as_float(timestep)
        schedule = self._timestep_list if schedule_timesteps is None else schedule_timesteps
        matches = [i for i, s in enumerate(schedule) if s == value]
        if not matches:
            raise ValueError(f"timestep {value} is not in this scheduler's timesteps {schedule}")
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _current_step(self, timestep) -> int:
        """The step index for this call of step(): set from ``timestep`` on the first call, then counted."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._timestep_list):
            first = self._timestep_list[0]
            hint = (f" (timestep {first} repeats at the start of the schedule, so the counter started at index 1 as in "
                    f"diffusers; call set_begin_index(0) before sampling to start at 0)"
                    if self._timestep_list.count(first) > 1 else "")
            raise RuntimeError(f"all {len(self._timestep_list)} steps are done; call set_timesteps() to sample "
                               f"again{hint}")
        return self._step_index


# --------------------------------------------------------------------------------------------- the base class
class Scheduler:
    """The shared part of every scheduler: construction from config keywords, β/ᾱ tables, from_config/save_config.

    Keyword arguments: the fields of ``config_class`` (diffusers' names and defaults). Errors: ValueError naming the
    argument for a bad value; TypeError for an unknown keyword. The values are kept as ``settings``, a frozen
    ``config_class`` dataclass; ``config`` is a diffusers-shaped dict copy of them (diffusers' code reads it).

    Every subclass's ``step(model_output, timestep, sample, ..., return_dict=True, *, guidance_scale=None)`` takes
    (each documents only what it adds or does differently):

    - model_output: the model's prediction (config.prediction_type), sample's shape; with guidance_scale,
      (2B, ...) = [uncond; cond], combined as uncond + s·(cond − uncond) (in torch first, or inside the fused op).
    - timestep: the current entry of ``timesteps``, a number or a scalar tensor.
    - sample: x at this timestep, (B, ...) fp32/fp16/bf16, unscaled (not what scale_model_input gave the model).
    - generator: a torch.Generator (or one per sample) for the noise the step draws, drawn as diffusers draws it.
    - return_dict: SchedulerOutput(prev_sample, pred_original_sample), or with False that tuple.
    """

    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    order: ClassVar[int] = 1  # model calls per timestep of the sampling schedule (diffusers' name)
    # the family whose configs interchange (diffusers' compatibles): the samplers of any ε/x0/v model, or LCM alone
    compatible_family: ClassVar[str] = "diffusion"

    def __init__(self, **kwargs):
        known = split_config(self.config_class, kwargs, strict=True)
        defaulted = set(self.config_class.field_names()) - set(known) | set(kwargs.get("_use_default_values", ()))
        self.settings = self.config_class(**known)  # the configuration: a frozen dataclass
        self._defaulted = tuple(sorted(defaulted & set(self.config_class.field_names())))
        self.betas = make_betas(self.settings)  # (T,) fp32
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t, (T,) fp32
        self.num_inference_steps: int | None = None

    @property
    def config(self) -> ConfigDict:
        """The settings as diffusers shapes a scheduler's config: a dict with attribute reads, made on each access
        (changing it changes nothing; use ``from_config(scheduler.config, key=value)``), with the fields left at their
        defaults under ``"_use_default_values"``. Accepted by fastdiff's and diffusers' ``from_config``."""
        config = config_dict(self.settings, self._defaulted)
        config.update(self.__dict__.get("_extra_config") or {})
        return config

    def __getattr__(self, name: str) -> Any:
        """Config values read as attributes (``scheduler.num_train_timesteps``), as diffusers allows; only called for
        names the scheduler itself does not have."""
        settings = self.__dict__.get("settings")
        if settings is not None and not name.startswith("__"):
            if name in settings.field_names():
                return getattr(settings, name)
            extra = self.__dict__.get("_extra_config") or {}
            if name in extra:
                return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_to_config(self, **kwargs) -> None:
        """Change config values after construction, as diffusers' ``register_to_config`` does: this scheduler's
        fields are checked (ValueError/TypeError naming the field) and replace their values in ``settings``, which
        step() reads; tables made at construction (β, ᾱ, σ) are not rebuilt, as in diffusers. Other keys are kept as
        extra config entries (in ``config`` and what save_config writes)."""
        fields = set(self.config_class.field_names())
        known = {k: v for k, v in kwargs.items() if k in fields}
        if known:
            self.settings = dataclasses.replace(self.settings, **known)
            self._defaulted = tuple(n for n in self._defaulted if n not in known)
        extra = {k: v for k, v in kwargs.items() if k not in fields}
        if extra:
            self._extra_config = {**(self.__dict__.get("_extra_config") or {}), **extra}

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes meant to take this scheduler's config with ``from_config``: the fastdiff schedulers
        of its family, this class included (as diffusers' ``compatibles``: LCM stands alone, the others interchange)."""
        from fastdiff import schedulers

        return [cls for cls in vars(schedulers).values()
                if isinstance(cls, type) and issubclass(cls, Scheduler) and cls is not Scheduler
                and cls.compatible_family == self.compatible_family]

    def __setstate__(self, state: dict) -> None:
        if "config" in state:  # pickled when the config was a dict-subclass attribute
            legacy = state.pop("config")
            state["settings"] = type(self).config_class(**legacy.to_dict())
            state["_defaulted"] = tuple(sorted(getattr(legacy, "_legacy_defaulted", ())))
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"

    def __len__(self) -> int:
        return self.settings.num_train_timesteps

    # ----------------------------------------------------------------- config in and out
    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from a dict, a diffusers scheduler's ``.config``, a fastdiff config, a ``scheduler_config.json`` or a
        folder holding one. Keyword arguments override config values. Keys diffusers marks as defaulted
        (``_use_default_values``) take this class's defaults, as in diffusers."""
        mapping = load_config_mapping(config)
        defaulted = set(mapping.get("_use_default_values", ()) or ())
        mapping = {k: v for k, v in mapping.items() if k not in defaulted and k != "_use_default_values"}
        known = split_config(cls.config_class, mapping, strict=False)
        return cls(**{**known, **kwargs})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """A local folder (optionally its ``subfolder``) holding scheduler_config.json."""
        return cls.from_config(os.path.join(path, subfolder) if subfolder else path, **kwargs)

    def save_config(self, save_directory: str | os.PathLike, **_) -> str:
        """Write ``save_directory/scheduler_config.json`` (readable by diffusers' from_pretrained); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        from fastdiff._version import __version__

        data = {"_class_name": type(self).__name__, "_fastdiff_version": __version__,
                **(self.__dict__.get("_extra_config") or {}), **self.settings.to_dict()}
        path = os.path.join(save_directory, CONFIG_NAME)
        write_json_atomic(path, data, sort_keys=True)
        return path

    save_pretrained = save_config

    # ----------------------------------------------------------------- helpers for subclasses
    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise TimestepsNotSetError(
                f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step() / scale_model_input()")

    def _spaced_timesteps(self, num_inference_steps, dtype, round_linspace: bool = True) -> np.ndarray:
        """n timesteps by config.timestep_spacing (and steps_offset), descending, as ``dtype``.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or steps_offset (a timestep ≥ T).
        """
        cfg = self.settings
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, round_linspace)
        return check_steps_offset(timesteps, cfg.num_train_timesteps, cfg.steps_offset).astype(dtype)
