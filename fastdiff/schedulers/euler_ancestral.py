"""Euler ancestral ("Euler a"): an Euler step down to σ_down, then fresh noise of σ_up, so that the marginal at
σ_{i+1} is kept (the ancestral step of Ho et al. 2020 written in σ space; k-diffusion's sample_euler_ancestral)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import Generator, randn_tensor
from fastdiff.schedulers.config import SchedulerConfig
from fastdiff.schedulers.schedules import sigma_schedule_from_timesteps
from fastdiff.schedulers.sigma import VarianceExplodingScheduler, x0_weights


@dataclass(frozen=True)
class EulerAncestralDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"


class EulerAncestralDiscreteScheduler(VarianceExplodingScheduler):
    """Euler ancestral sampler (σ_up/σ_down split of each step, k-diffusion), diffusers-compatible; configured by
    :class:`EulerAncestralDiscreteConfig`. Timesteps are fp32, as in diffusers."""

    config_class = EulerAncestralDiscreteConfig

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose n timesteps (config.timestep_spacing) → fp32 ``timesteps`` and ``sigmas`` (n + 1, ending at 0).

        Raises ValueError naming num_inference_steps when it is not an integer in [1, num_train_timesteps].
        """
        schedule = self._spaced_timesteps(num_inference_steps, np.float32, round_linspace=False)
        self._set_schedule(schedule, sigma_schedule_from_timesteps(schedule, self._train_sigmas), 0.0, device)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """One ancestral Euler step from σ_i to σ_{i+1}: deterministic to σ_down, then + σ_up·z.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (z is drawn at every step, as diffusers
        does). Returns x_{i+1} and x̂0.
        """
        model_output, sample, sigma, sigma_next, dtype = self._begin_step(model_output, timestep, sample,
                                                                          guidance_scale)
        # 1. x̂0 = D(x; σ) = a·x + b·m
        a, b = x0_weights(sigma, self.settings.prediction_type)
        # 2. split σ_{i+1}² = σ_down² + σ_up², σ_up² = σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        # 3. Euler to σ_down, + σ_up·z: x + (σ_down − σ)·(x − x̂0)/σ + σ_up·z = (1 + r)·x − r·x̂0 + σ_up·z,
        #    r = (σ_down − σ)/σ; one fused call (z drawn at every step, as diffusers does)
        noise = randn_tensor(sample.shape, generator, sample.device, dtype)
        r = (sigma_down - sigma) / sigma
        x0_pred, prev_sample = ops.linear_step(sample, model_output, [noise],
                                               coefficients=[[a, b, 0.0], [1.0 + r, 0.0, sigma_up, -r]],
                                               guidance_scale=guidance_scale)
        return self._end_step(prev_sample, x0_pred.to(dtype), dtype, return_dict)
