"""DDPM: ancestral sampling of the learned reverse chain (Ho et al. 2020), through the fused fastdiff.ops.ddpm_step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import Generator, as_float, broadcast_to, randn_like
from fastdiff.schedulers.config import ClipSampleConfig
from fastdiff.schedulers.schedules import check_custom_timesteps, check_schedule_source
from fastdiff.schedulers.vp import FusedStep, VariancePreservingScheduler
from fastdiff.validation import VARIANCE_TYPES, check_choice


@dataclass(frozen=True)
class DDPMConfig(ClipSampleConfig):
    variance_type: str = "fixed_small"  # σ_t² = β̃_t, the posterior variance ("fixed_small") or β_t ("fixed_large")

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)


class DDPMScheduler(VariancePreservingScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020, Algorithm 2), diffusers-compatible; configured by
    :class:`DDPMConfig`."""

    config_class = DDPMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.custom_timesteps = False

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

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule, −1 after the last (then ᾱ_prev = 1); before
        set_timesteps, t − 1 (the training chain). As in diffusers: after set_timesteps a tensor (on the timesteps'
        device); before, ``timestep − 1`` in timestep's own type."""
        if self.num_inference_steps is None:
            return timestep - 1
        return torch.tensor(self._previous_timestep(int(as_float(timestep))), device=self.timesteps.device)

    def _previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        try:
            i = self._timestep_list.index(t)
        except ValueError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self._timestep_list}") from None
        return self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else -1

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
        options = self._fused_options(variance_type=self.settings.variance_type)
        return FusedStep("ddpm_step", alpha_prod_t, alpha_prod_t_prev, noise, options)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """x_t → x_{t−1} ~ N(μ̃(x_t, x̂0), σ_t²I) (Ho et al. 2020, eqs. 6–7), in one fused fastdiff.ops.ddpm_step:
        x̂0 from the model output (clipped), the posterior mean μ̃_t(x_t, x̂0) (eq. 7), + σ_t·z.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (z is drawn for every t > 0, as diffusers
        does, so that seeds carry over). Returns x_{t−1} and x̂0.
        """
        return self._fused_step_output(model_output, sample, guidance_scale, return_dict,
                                       lambda: self.fused_step(timestep, sample, generator))

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022, §4)."""
        alpha_prod = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha_prod_t = broadcast_to(alpha_prod[torch.as_tensor(timesteps, device=sample.device).long()], sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample
