"""What every scheduler shares: the config dataclass, the noise schedules (β, timesteps, σ), from_config and
save_config, the step output, input checks, the steps several samplers share, and noise drawn exactly as diffusers
draws it.

Field names, defaults and meanings follow diffusers, so a diffusers ``scheduler_config.json`` (or a diffusers
scheduler's ``.config``) loads as it is, and what ``save_config`` writes loads back into diffusers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff import reference
from fastdiff.files import read_json_object, write_json_atomic
from fastdiff.validation import PREDICTION_TYPES, check_bool, check_choice, check_int, check_real

logger = logging.getLogger("fastdiff.schedulers")

CONFIG_NAME = "scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

Generator = torch.Generator | Sequence[torch.Generator] | None


class TimestepsNotSetError(RuntimeError, ValueError):
    """step() (or scale_model_input) before set_timesteps(); both a RuntimeError and, as in diffusers, a ValueError."""


# --------------------------------------------------------------------------------------------- validation
def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    """An integer in [1, num_train_timesteps]; anything else is a ValueError naming num_inference_steps."""
    if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, numbers.Integral):
        # a ValueError, like the range check below (what diffusers users catch)
        kind = type(num_inference_steps).__name__
        raise ValueError(f"num_inference_steps must be an integer, got {kind} {num_inference_steps!r}")  # noqa: TRY004
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                         f"got {num_inference_steps}")
    return int(num_inference_steps)


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


def guide(model_output: Tensor, sample: Tensor, guidance_scale: float | None) -> Tensor:
    """Classifier-free guidance in torch (Ho & Salimans 2022, eq. 6): [uncond; cond] → uncond + s·(cond − uncond)."""
    check_step_inputs(model_output, sample, guidance_scale)
    if guidance_scale is None:
        return model_output
    return reference.guide(model_output, check_real("guidance_scale", guidance_scale))


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
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


# --------------------------------------------------------------------------------------------- noise schedules
def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999), ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008 (Nichol & Dhariwal 2021, eq. 17)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ_t so that √ᾱ_T = 0 while √ᾱ_1 is kept (Lin et al. 2024, Algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(config: SchedulerConfig) -> Tensor:
    """β_1..β_T (fp32, (T,)) from trained_betas or the named schedule, optionally rescaled to zero terminal SNR."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":  # Ho et al. 2020, §4
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion: √β linear
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2
        betas = torch.tensor(cosine_betas(T), dtype=torch.float32)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0,
                     round_linspace: bool = True) -> np.ndarray:
    """n timesteps in [0, T), descending, float64 (Lin et al. 2024, Table 2).

    leading:  t_i = i·⌊T/n⌋ + steps_offset;   trailing: round(T − i·T/n) − 1;   linspace: n points over [0, T − 1]
    (rounded unless round_linspace=False, as Euler keeps them fractional).
    """
    T = num_train_timesteps
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    timesteps = np.linspace(0, T - 1, n)
    return (timesteps.round() if round_linspace else timesteps)[::-1].copy()


def train_sigmas(alphas_cumprod: Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), the variance-exploding noise level of each training timestep, fp32 (T,) ascending."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n − 1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..n−1, ρ = 7 (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each σ: linear interpolation of log σ between neighbouring timesteps.

    log_sigmas: log σ_t of the T training timesteps, ascending. Values outside the range clamp to 0 or T − 1.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    low = (np.searchsorted(log_sigmas, log_sigma, side="right") - 1).clip(0, len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


# --------------------------------------------------------------------------------------------- ᾱ helpers (DDPM, DDIM)
def alpha_arg(alpha_prod: float, sample: Tensor):
    """ᾱ_t as the fused steps take it: a Python float. ᾱ_T = 0 (zero terminal SNR) is outside the ops' range check
    (0 < ᾱ_t), so it goes as a per-sample (B,) tensor, whose values the ops do not check."""
    if alpha_prod > 0.0:
        return alpha_prod
    return torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)


def add_noise_vp(alphas_cumprod: Tensor, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
    """The forward process q(x_t | x0): x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (Ho et al. 2020, eq. 4); timesteps () or (B,)."""
    check_add_noise(original_samples, noise)
    timesteps = torch.as_tensor(timesteps)
    in_range = timesteps.device.type != "cpu" or not timesteps.numel() or (  # no device sync for GPU timesteps
        0 <= int(timesteps.min()) and int(timesteps.max()) < len(alphas_cumprod))
    if not in_range:
        raise ValueError(f"timesteps must be in [0, {len(alphas_cumprod)}), got {timesteps.tolist()}")
    alpha_prod = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    timesteps = timesteps.to(original_samples.device).long()
    alpha_prod_t = broadcast_to(alpha_prod[timesteps], original_samples)
    return alpha_prod_t**0.5 * original_samples + (1 - alpha_prod_t) ** 0.5 * noise


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SchedulerConfig(dict):
    """The fields every scheduler has, with diffusers' names, defaults and meaning.

    Read-only, and also a dict of the same values (as diffusers' FrozenDict is), so ``config.beta_schedule``,
    ``config["beta_schedule"]``, ``dict(config)``, ``**config`` and diffusers' own ``from_config(config)`` all work.
    The dict also lists the fields that were left at their defaults under ``"_use_default_values"`` (diffusers' key):
    switching scheduler class with from_config gives those the new class's defaults, as in diffusers.
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
        check_int("num_train_timesteps", self.num_train_timesteps, minimum=1)
        check_real("beta_start", self.beta_start)
        check_real("beta_end", self.beta_end)
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
        check_bool("rescale_betas_zero_snr", self.rescale_betas_zero_snr)
        dict.update(self, {name: getattr(self, name) for name in self.field_names()})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def with_defaulted(self, names) -> SchedulerConfig:
        """Record which fields were left at their defaults (diffusers' ``_use_default_values``); returns self."""
        names = sorted(set(names) & set(self.field_names()))
        if names:
            dict.__setitem__(self, "_use_default_values", names)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain JSON-able dict (trained_betas as a list)."""
        d = {name: getattr(self, name) for name in self.field_names()}
        if d.get("trained_betas") is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; make a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _read_only

    def __reduce__(self):
        return _rebuild_config, (type(self), self.to_dict(), self.get("_use_default_values", ()))


def _rebuild_config(cls, fields: dict, defaulted) -> SchedulerConfig:
    return cls(**fields).with_defaulted(defaulted)


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
    """A config given as a mapping (dict, a diffusers FrozenDict, a fastdiff config), a scheduler_config.json file, a
    folder holding one, or a pipeline folder holding scheduler/scheduler_config.json."""
    if isinstance(config, Mapping):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        candidates = [path] if path.endswith(".json") else [os.path.join(path, CONFIG_NAME),
                                                           os.path.join(path, "scheduler", CONFIG_NAME)]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return read_json_object(candidate)
        raise FileNotFoundError(f"no {CONFIG_NAME} found at {path!r} (looked for {candidates})")
    raise TypeError(f"config must be a mapping, a scheduler_config.json path or a folder, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------- output
@dataclass
class FusedStep:
    """One DDIM/DDPM update as the fused op takes it: which op, ᾱ_t and ᾱ_prev (floats), the noise z (or None) and
    the op's fixed options. ``step()`` runs it at once; a CUDA graph captures the op with ᾱ as (B,) device tensors
    and replays it with this plan's values filled in."""

    op: str  # "ddim_step" or "ddpm_step" (fastdiff.ops)
    alpha_prod_t: float
    alpha_prod_t_prev: float
    noise: Tensor | None
    options: dict[str, Any]

    def run(self, sample: Tensor, model_output: Tensor, guidance_scale: float | None = None,
            alpha_prod_t=None, alpha_prod_t_prev=None) -> tuple[Tensor, Tensor]:
        """(prev_sample, pred_original_sample); the alphas default to this plan's floats (a tensor may replace them)."""
        from fastdiff import ops

        a_t = alpha_arg(self.alpha_prod_t, sample) if alpha_prod_t is None else alpha_prod_t
        a_prev = self.alpha_prod_t_prev if alpha_prod_t_prev is None else alpha_prod_t_prev
        return getattr(ops, self.op)(sample, model_output, a_t, a_prev, noise=self.noise,
                                     guidance_scale=guidance_scale, **self.options)


@dataclass
class SchedulerOutput:
    """What step() returns: x_{t−1} (the next model input) and the model's estimate of x0 at this step."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key):
        """``out["prev_sample"]`` or ``out[0]``, as on diffusers' outputs."""
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


# --------------------------------------------------------------------------------------------- the base class
class Scheduler:
    """The shared part of every scheduler: construction from config keywords, β/ᾱ tables, from_config/save_config."""

    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    order: ClassVar[int] = 1  # model calls per step (all of ours are single-call; diffusers' name)

    def __init__(self, **kwargs):
        known = split_config(self.config_class, kwargs, strict=True)
        defaulted = set(self.config_class.field_names()) - set(known) | set(kwargs.get("_use_default_values", ()))
        self.config = self.config_class(**known).with_defaulted(defaulted)
        self.betas = make_betas(self.config)  # (T,) fp32
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t, (T,) fp32
        self.num_inference_steps: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

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

        data = {"_class_name": type(self).__name__, "_fastdiff_version": __version__, **self.config.to_dict()}
        path = os.path.join(save_directory, CONFIG_NAME)
        write_json_atomic(path, data, sort_keys=True)
        return path

    save_pretrained = save_config

    # ----------------------------------------------------------------- helpers for subclasses
    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise TimestepsNotSetError(
                f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step() / scale_model_input()")

    def _check_timestep_range(self, t: int) -> int:
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.config.num_train_timesteps}), got {t}")
        return t


class VariancePreservingScheduler(Scheduler):
    """Samplers of x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (DDPM, DDIM): x_T ~ N(0, I), the model sees x_t unscaled, and step()
    reads ᾱ_t as a Python float. Before set_timesteps, ``timesteps`` is the whole training chain, int64 descending."""

    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._alphas_cumprod_list = self.alphas_cumprod.tolist()
        T = self.config.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.int64)

    def _spaced_timesteps(self, num_inference_steps) -> np.ndarray:
        """n timesteps by config.timestep_spacing (and steps_offset), int64 descending.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or steps_offset (a timestep ≥ T).
        """
        T = self.config.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        timesteps = spaced_timesteps(self.config.timestep_spacing, T, n, self.config.steps_offset)
        if timesteps.max() >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timestep {int(timesteps.max())} outside "
                             f"[0, {T}) for num_inference_steps={n}")
        return timesteps.astype(np.int64)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """DDPM and DDIM feed x_t to the model unscaled."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε for integer timesteps of shape () or (B,)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)


class SigmaScheduler(Scheduler):
    """Schedulers that step in σ (variance-exploding) space, DPM-Solver and Euler: a step counter, σ tables, add_noise.

    ``self.sigmas`` holds σ for each inference timestep plus the final σ (fp32 CPU, n + 1); ``self.timesteps`` the n
    timesteps the model sees. The counter starts at the index of the first timestep passed to step() (or at
    ``set_begin_index``) and advances by one per step, as in diffusers.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config.rescale_betas_zero_snr:
            # ᾱ_T = 0 would make σ_T infinite: keep it tiny instead (as diffusers does)
            self.alphas_cumprod[-1] = 2**-24
        self._train_sigmas = train_sigmas(self.alphas_cumprod)  # (T,) fp32, ascending in t
        self._log_sigmas = np.log(self._train_sigmas)
        T = self.config.num_train_timesteps
        # before set_timesteps: the whole training chain (only add_noise uses it)
        self._set_schedule(np.arange(T - 1, -1, -1, dtype=np.float64), self._train_sigmas[::-1], 0.0, None)
        self.num_inference_steps = None

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last: float, device,
                      timestep_dtype: torch.dtype = torch.float32) -> None:
        sigmas = np.concatenate([np.asarray(sigmas, dtype=np.float64), [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)  # (n + 1,) fp32 on the CPU
        self._sigma_list = sigmas.tolist()  # the same values as Python floats, read by step()
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=timestep_dtype)
        self._timestep_list = self.timesteps.tolist()
        self.num_inference_steps = len(timesteps)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _last_sigma(self, final_sigmas_type: str) -> float:
        """σ after the last step: 0 ("zero", a clean sample) or σ at training timestep 0 ("sigma_min")."""
        return 0.0 if final_sigmas_type == "zero" else float(self._train_sigmas[0])

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
        if self._step_index >= self.num_inference_steps:
            first = self._timestep_list[0]
            hint = (f" (timestep {first} repeats at the start of the schedule, so the counter started at index 1 as in "
                    f"diffusers; call set_begin_index(0) before sampling to start at 0)"
                    if self._timestep_list.count(first) > 1 else "")
            raise RuntimeError(f"all {self.num_inference_steps} steps are done; call set_timesteps() to sample "
                               f"again{hint}")
        return self._step_index

    def _sigma_indices(self, timesteps: Tensor) -> list[int]:
        """Schedule index of each timestep, for add_noise (the running index once a pipeline has set a begin index)."""
        n = timesteps.numel()
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten().tolist()]
        return [self._step_index if self._step_index is not None else self._begin_index] * n


class VarianceExplodingScheduler(SigmaScheduler):
    """Samplers of x = x0 + σ·ε (Euler, Euler ancestral): x_T has std σ_max and the model sees x/√(σ² + 1)."""

    @property
    def init_noise_sigma(self) -> float:
        """σ of x_T: σ_max ("linspace"/"trailing"), or √(σ_max² + 1) ("leading"), as in diffusers."""
        sigma_max = max(self._sigma_list)
        return sigma_max if self.config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """x/√(σ² + 1), the variance-preserving x_t the model was trained on (Karras et al. 2022, Table 1, c_in)."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._sigma_list[self._step_index]
        return sample / math.sqrt(sigma**2 + 1)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = x0 + σ·ε at the σ of each timestep's place in the schedule; timesteps () or (B,)."""
        check_add_noise(original_samples, noise)
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._sigma_indices(torch.as_tensor(timesteps))], original_samples)
        return original_samples + noise * sigma

    def _begin_step(self, model_output: Tensor, timestep, sample: Tensor,
                    guidance_scale: float | None) -> tuple[Tensor, Tensor, float, float]:
        """The start of step(): (guided model output, x in fp32, σ_i, σ_{i+1}) for this call's place in the schedule."""
        model_output = guide(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        return model_output, sample.to(torch.float32), self._sigma_list[i], self._sigma_list[i + 1]

    def _end_step(self, prev_sample: Tensor, x0_pred: Tensor, dtype: torch.dtype, return_dict: bool):
        """The end of step(): x_{i+1} in ``dtype`` (the model output's), the counter advanced, the output returned."""
        prev_sample = prev_sample.to(dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0_pred
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)


def euler_step(sample: Tensor, x0_pred: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of the probability-flow ODE from σ to σ_next (Karras et al. 2022, Algorithm 2, lines 7–8):
    d = (x − x̂0)/σ, x + (σ_next − σ)·d."""
    derivative = (sample - x0_pred) / sigma
    return sample + derivative * (sigma_next - sigma)


def sigma_schedule_from_timesteps(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, interpolated linearly between training timesteps."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)
