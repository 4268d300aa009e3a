"""Scheduler configuration: the frozen config dataclass every scheduler's settings extend, the diffusers options each
one accepts or refuses, the diffusers-shaped dict view (``scheduler.config``), and reading a config from a mapping, a
``scheduler_config.json`` or a folder holding one.

Field names, defaults and meanings follow diffusers, so a diffusers ``scheduler_config.json`` (or a diffusers
scheduler's ``.config``) loads as it is, and what ``Scheduler.save_config`` writes loads back into diffusers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from fastdiff.files import read_json_object
from fastdiff.validation import PREDICTION_TYPES, check_choice, check_int, check_real, normalize_config

logger = logging.getLogger("fastdiff.schedulers")

CONFIG_NAME = "scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields every scheduler has, with diffusers' names, defaults and meaning: a small frozen dataclass.

    A scheduler holds one as ``scheduler.settings``; ``scheduler.config`` is the diffusers-shaped dict made from it
    (see :class:`ConfigDict`). Subclasses add their scheduler's fields and list the diffusers options they refuse.
    """

    num_train_timesteps: int = 1000  # T, the length of the training chain
    beta_start: float = 0.0001  # β_1 of the linear / scaled_linear schedules
    beta_end: float = 0.02  # β_T
    beta_schedule: str = "linear"  # "linear", "scaled_linear" (√β linear, latent diffusion), "squaredcos_cap_v2"
    trained_betas: tuple | None = None  # explicit β_1..β_T; overrides the three above
    prediction_type: str = "epsilon"  # the model predicts "epsilon" (noise), "sample" (x0) or "v_prediction"
    timestep_spacing: str = "leading"  # how n inference steps are picked from T: "leading", "trailing", "linspace"
    steps_offset: int = 0  # added to "leading" timesteps (1 for Stable Diffusion)
    rescale_betas_zero_snr: bool = False  # rescale β so that ᾱ_T = 0 (zero terminal SNR)

    # diffusers options this scheduler does not implement, with the default value it accepts (any other → ValueError)
    UNSUPPORTED: ClassVar[dict] = {}
    # diffusers options that only matter when an unsupported option is switched on: accepted with any value, ignored
    INERT: ClassVar[tuple] = ()

    def __post_init__(self):
        normalize_config(self)  # every int/float/bool field type-checked and stored as a plain Python value
        check_int("num_train_timesteps", self.num_train_timesteps, minimum=1)
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas.tolist() if isinstance(self.trained_betas, Tensor)
                               else self.trained_betas, dtype=np.float64).reshape(-1)
            if len(betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas must have num_train_timesteps={self.num_train_timesteps} values, "
                                 f"got {len(betas)}")
            if not (np.isfinite(betas).all() and (betas >= 0).all() and (betas <= 1).all()):
                raise ValueError("trained_betas must all be in [0, 1]")
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in betas))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_int("steps_offset", self.steps_offset, minimum=0)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain JSON-able dict (trained_betas as a list)."""
        d = {name: getattr(self, name) for name in self.field_names()}
        if d.get("trained_betas") is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d


class ConfigDict(dict):
    """What ``scheduler.config`` returns: the scheduler's settings as a plain dict with attribute reads, shaped like
    diffusers' config, so ``config.beta_schedule``, ``config["beta_schedule"]``, ``dict(config)``, ``**config`` and
    diffusers' own ``SomeScheduler.from_config(config)`` work (diffusers' from_config takes only ``dict`` instances).

    It is a copy made on each access: changing it does not change the scheduler (its settings are a frozen
    dataclass); make a new scheduler with ``from_config(config, key=value)``. Fields left at their defaults are
    listed under diffusers' ``"_use_default_values"`` key, so switching class with from_config gives those fields the
    new class's defaults, as in diffusers.
    """

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no field {name!r}") from None


def config_dict(settings: SchedulerConfig, defaulted=()) -> ConfigDict:
    """The diffusers-shaped dict of ``settings``; ``defaulted`` names the fields left at their defaults."""
    d = ConfigDict(settings.to_dict())
    names = sorted(set(defaulted) & set(settings.field_names()))
    if names:
        d["_use_default_values"] = names
    return d


def _rebuild_config(cls, fields: dict, defaulted=()) -> SchedulerConfig:
    """Unpickle a config pickled when configs were dict subclasses (their __reduce__ named this function). The
    fields it left at their defaults ride along as ``_legacy_defaulted`` (not a field: equality is unaffected) for
    the scheduler that held it (``Scheduler.__setstate__``)."""
    config = cls(**fields)
    object.__setattr__(config, "_legacy_defaulted", tuple(defaulted or ()))
    return config


def split_config(config_class: type[SchedulerConfig], config: Mapping, strict: bool) -> dict:
    """The fields of config_class found in config; the other keys are checked against diffusers' options.

    Private keys (``_class_name``, ``_diffusers_version``, …) are ignored with a debug log. A key this scheduler does
    not know is ignored with a debug log too (strict=False: a config file), or is a TypeError (strict=True:
    constructor keywords). A diffusers option this scheduler does not implement is accepted at its default value
    (debug log) and is a ValueError otherwise.
    """
    names = config_class.field_names()
    known = {}
    for key, value in config.items():
        if key in names:
            known[key] = value
        elif key.startswith("_"):
            logger.debug("%s: ignoring %s=%r", config_class.__name__, key, value)
        elif key in config_class.UNSUPPORTED:
            default = config_class.UNSUPPORTED[key]
            if not (value == default or (value is None and default is None)):
                raise ValueError(f"{key}={value!r} is not supported by fastdiff's {config_class.__name__} "
                                 f"(only {key}={default!r}); supported options: {list(names)}")
            logger.debug("%s: ignoring %s=%r (the only supported value)", config_class.__name__, key, value)
        elif key in config_class.INERT:
            logger.debug("%s: ignoring %s=%r", config_class.__name__, key, value)
        elif strict:
            raise TypeError(f"unexpected keyword argument {key!r}; {config_class.__name__} takes {list(names)}")
        else:
            logger.debug("%s: ignoring unknown config key %s=%r", config_class.__name__, key, value)
    return known


def load_config_mapping(config) -> Mapping:
    """A config given as a mapping (dict, a diffusers FrozenDict, a fastdiff ``scheduler.config``), a fastdiff
    SchedulerConfig (``scheduler.settings``), a scheduler_config.json file, a
    folder holding one, or a pipeline folder holding scheduler/scheduler_config.json."""
    if isinstance(config, Mapping):
        return config
    if isinstance(config, SchedulerConfig):
        return config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        candidates = [path] if path.endswith(".json") else [os.path.join(path, CONFIG_NAME),
                                                           os.path.join(path, "scheduler", CONFIG_NAME)]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return read_json_object(candidate)
        raise FileNotFoundError(f"no {CONFIG_NAME} found at {path!r} (looked for {candidates})")
    raise TypeError(f"config must be a mapping, a scheduler_config.json path or a folder, got {type(config).__name__}")


def check_scipy(option: str) -> None:
    """ImportError naming ``option`` where scipy (an optional dependency) is missing."""
    try:
        import scipy.special  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{option}=True needs scipy (pip install scipy)") from exc


def check_sigma_spacings(config, names: tuple[str, ...]) -> None:
    """The σ-spacing switches ``names`` (use_karras_sigmas, use_exponential_sigmas, ...): None stored as False (as
    diffusers allows), at most one on (ValueError naming them), scipy present for use_beta_sigmas (ImportError). Call
    before the base class's checks, which type-check the booleans."""
    for name in names:
        if getattr(config, name) is None:
            object.__setattr__(config, name, False)
    on = [name for name in names if getattr(config, name)]
    if len(on) > 1:
        raise ValueError(f"only one of {', '.join(names)} can be on, got {on}")
    if "use_beta_sigmas" in on:
        check_scipy("use_beta_sigmas")


def check_lambda_min_clipped(config) -> None:
    """config.lambda_min_clipped (the DPM-Solvers' smallest λ sampled): a real number or −inf (ValueError naming it
    otherwise), stored as a float."""
    clip = config.lambda_min_clipped
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or math.isnan(clip) or clip == math.inf:
        raise ValueError(f"lambda_min_clipped must be a real number or -inf, got {clip!r}")
    object.__setattr__(config, "lambda_min_clipped", float(clip))


def check_thresholding(config) -> None:
    """The dynamic-thresholding fields (``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``)."""
    ratio = check_real("dynamic_thresholding_ratio", config.dynamic_thresholding_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
    check_real("sample_max_value", config.sample_max_value, positive=True)


@dataclass(frozen=True)
class ClipSampleConfig(SchedulerConfig):
    """The fields DDPM and DDIM add: the bounds on the predicted x0, a clamp or dynamic thresholding."""

    clip_sample: bool = True  # clamp the predicted x0 to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    thresholding: bool = False  # dynamic thresholding of x0 (Saharia et al. 2022) instead of the clamp
    dynamic_thresholding_ratio: float = 0.995  # the quantile of |x0| per sample that sets the threshold s
    sample_max_value: float = 1.0  # the largest s

    def __post_init__(self):
        super().__post_init__()
        check_real("clip_sample_range", self.clip_sample_range, positive=True)
        check_thresholding(self)

    def threshold(self) -> tuple[float, float] | None:
        """(ratio, max_value) where thresholding is on, else None (what the steps take)."""
        return (self.dynamic_thresholding_ratio, self.sample_max_value) if self.thresholding else None
