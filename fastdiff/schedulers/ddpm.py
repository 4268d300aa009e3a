"""DDPM: ancestral sampling of the learned reverse chain (Ho et al. 2020), through the fused fastdiff.ops.ddpm_step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import (
    Generator,
    check_step_inputs,
    guided_model_output,
    randn_like,
    step_output,
)
from fastdiff.schedulers.config import ClipSampleConfig
from fastdiff.schedulers.schedules import check_custom_timesteps, check_schedule_source
from fastdiff.schedulers.vp import FusedStep, VariancePreservingScheduler
from fastdiff.validation import VARIANCE_TYPES, check_choice


# diffusers' variance types: σ_t² = β̃_t, the posterior variance ("fixed_small"; "fixed_small_log" is the same
# through its log, "other" falls back to it as in diffusers) or β_t ("fixed_large", "fixed_large_log"); or predicted
# by the model as extra output channels: the variance itself ("learned") or a value v in [−1, 1] interpolating the
# log variance between β̃_t and β_t ("learned_range", Nichol & Dhariwal 2021, eq. 15).
DDPM_VARIANCE_TYPES = (*VARIANCE_TYPES, "fixed_small_log", "fixed_large_log", "learned", "learned_range", "other")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
FUSED_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "other": "fixed_small",
                  "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}


@dataclass(frozen=True)
class DDPMConfig(ClipSampleConfig):
    variance_type: str = "fixed_small"  # one of DDPM_VARIANCE_TYPES (above)

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, DDPM_VARIANCE_TYPES)


class DDPMScheduler(VariancePreservingScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020, Algorithm 2), diffusers-compatible; configured by
    :class:`DDPMConfig`."""

    config_class = DDPMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.custom_timesteps = False

    @property
    def has_fused_step(self) -> bool:
        """Whether :meth:`fused_step` plans this update (not for a learned variance: it needs the model's variance)."""
        return super().has_fused_step and self.settings.variance_type not in LEARNED_VARIANCE_TYPES

    def _require_timesteps(self) -> None:
        """Nothing to require: before set_timesteps, step() runs the training chain t → t − 1, as in diffusers
        (training code and add_noise users rely on it)."""

    @property
    def variance_type(self) -> str:
        return self.settings.variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the n timesteps to sample with (config.timestep_spacing), or take custom descending ``timesteps``.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or timesteps (not descending in [0, T)).
        """
        custom = check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps) == "timesteps"
        if custom:
            schedule = check_custom_timesteps(timesteps, self.settings.num_train_timesteps, np.int64)
        else:
            schedule = self._spaced_timesteps(num_inference_steps, np.int64)
        self._set_schedule(schedule, device)
        self.custom_timesteps = custom

    def fused_step(self, timestep, sample: Tensor, generator: Generator = None) -> FusedStep:
        """The plan of one fused ``ops.ddpm_step`` call (ᾱ_t, ᾱ_prev, z), which :meth:`step` runs at once."""
        # 1. t, the previous timestep, and ᾱ at both
        t = self._plan_timestep(timestep)
        prev_t = self._previous_timestep(t)
        alpha_prod_t = self._alphas_cumprod_list[t]
        alpha_prod_t_prev = self._alphas_cumprod_list[prev_t] if prev_t >= 0 else 1.0
        # 2. z ~ N(0, I) for every t > 0 (diffusers' rule, kept so that seeds carry over)
        noise = None
        if t > 0:
            noise = randn_like(sample, generator)
        if self.settings.variance_type in LEARNED_VARIANCE_TYPES:
            raise ValueError(f"variance_type={self.settings.variance_type!r} needs the model's predicted variance: it "
                             "has no fused step (call step() with the model output's 2C channels)")
        options = self._fused_options(variance_type=FUSED_VARIANCE[self.settings.variance_type])
        return FusedStep("ddpm_step", alpha_prod_t, alpha_prod_t_prev, noise, options)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """x_t → x_{t−1} ~ N(μ̃(x_t, x̂0), σ_t²I) (Ho et al. 2020, eqs. 6–7), in one fused fastdiff.ops.ddpm_step:
        x̂0 from the model output (clipped), the posterior mean μ̃_t(x_t, x̂0) (eq. 7), + σ_t·z.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (z is drawn for every t > 0, as diffusers
        does, so that seeds carry over). Returns x_{t−1} and x̂0.
        """
        if self.settings.variance_type in LEARNED_VARIANCE_TYPES:
            return self._learned_variance_step(model_output, timestep, sample, generator, return_dict, guidance_scale)
        return self._fused_step_output(model_output, sample, guidance_scale, return_dict,
                                       lambda: self.fused_step(timestep, sample, generator))

    def _learned_variance_step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator,
                               return_dict: bool, guidance_scale: float | None):
        """step() for a model that predicts its variance: model_output (B, 2C, ...) = [prediction; variance] (with
        guidance_scale, (2B, 2C, ...) = [uncond; cond] rows: the prediction guided, the variance the cond rows').
        The posterior mean and x̂0 as in the fused step; σ_t² = the predicted variance ("learned") or
        exp(v·log β_t + (1 − v)·log β̃_t) with v = (p + 1)/2 ("learned_range"), as diffusers computes them."""
        channels = sample.shape[1] if isinstance(sample, Tensor) and sample.ndim > 1 else None
        if not isinstance(model_output, Tensor) or channels is None or model_output.ndim != sample.ndim \
                or model_output.shape[1] != 2 * channels:
            got = tuple(model_output.shape) if isinstance(model_output, Tensor) else type(model_output).__name__
            raise ValueError(f"variance_type={self.settings.variance_type!r}: model_output must have 2C = "
                             f"{2 * (channels or 0)} channels (the prediction, then the variance), got {got}")
        shape_2c = (sample.shape[0], 2 * channels, *sample.shape[2:])  # what the checks compare model_output with
        check_step_inputs(model_output, torch.empty(shape_2c, dtype=sample.dtype, device="meta"), guidance_scale)
        prediction, predicted_variance = model_output.split(channels, dim=1)
        if guidance_scale is not None:  # guide the prediction; the variance is the conditional rows' (as DiT/GLIDE)
            prediction = guided_model_output(prediction, sample, guidance_scale)
            predicted_variance = predicted_variance[sample.shape[0]:]
        t = self._plan_timestep(timestep)
        prev_t = self._previous_timestep(t)
        a_t = self._alphas_cumprod_list[t]
        a_prev = self._alphas_cumprod_list[prev_t] if prev_t >= 0 else 1.0
        prev_mean, x0_pred = self._fused_step_output(
            prediction, sample, None, False,
            lambda: FusedStep("ddpm_step", a_t, a_prev, None, self._fused_options(variance_type="fixed_small")))
        if t == 0:
            return step_output(prev_mean, x0_pred, return_dict)
        noise = randn_like(prediction, generator)
        beta_t = 1 - a_t / a_prev
        if self.settings.variance_type == "learned":
            std = predicted_variance.float() ** 0.5
        else:
            min_log = math.log(max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20))
            frac = (predicted_variance.float() + 1) / 2
            std = torch.exp(0.5 * (frac * math.log(beta_t) + (1 - frac) * min_log))
        prev_sample = (prev_mean.float() + std * noise.float()).to(sample.dtype)
        return step_output(prev_sample, x0_pred, return_dict)
