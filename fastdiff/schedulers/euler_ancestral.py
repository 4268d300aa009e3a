"""Euler ancestral ("Euler a"): an Euler step down to σ_down, then fresh noise of σ_up, so that the marginal at
σ_{i+1} is kept (the ancestral step of Ho et al. 2020 written in σ space; k-diffusion's sample_euler_ancestral)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastdiff.schedulers.base import (
    Generator,
    SchedulerConfig,
    VarianceExplodingScheduler,
    check_num_inference_steps,
    euler_step,
    randn_tensor,
    sigma_schedule_from_timesteps,
)
from fastdiff.schedulers.euler import euler_timesteps, x0_from_sigma


@dataclass(frozen=True)
class EulerAncestralDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"


class EulerAncestralDiscreteScheduler(VarianceExplodingScheduler):
    """Euler ancestral sampler (σ_up/σ_down split of each step, k-diffusion), diffusers-compatible.

    Keyword arguments: the fields of :class:`EulerAncestralDiscreteConfig` (diffusers' names and defaults).
    Timesteps are fp32, as in diffusers. Errors: ValueError naming the argument for a bad value; TypeError for an
    unknown keyword.
    """

    config_class = EulerAncestralDiscreteConfig

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose n timesteps (config.timestep_spacing) → fp32 ``timesteps`` and ``sigmas`` (n + 1, ending at 0).

        Raises ValueError naming num_inference_steps when it is not an integer in [1, num_train_timesteps].
        """
        T = self.config.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        schedule = euler_timesteps(self.config, n)
        if schedule.max() > T - 1:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timestep {schedule.max()} outside [0, {T})")
        self._set_schedule(schedule, sigma_schedule_from_timesteps(schedule, self._train_sigmas), 0.0, device)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: Generator = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
    ):
        """One ancestral Euler step from σ_i to σ_{i+1}: deterministic to σ_down, then + σ_up·z.

        Args:
            model_output: the model's prediction (config.prediction_type), sample's shape; with guidance_scale,
                (2B, ...) = [uncond; cond], combined in torch first.
            timestep: the current entry of ``timesteps`` (a number or a scalar tensor).
            sample: x at σ_i (unscaled), (B, ...).
            generator: torch.Generator (or one per sample) for z, drawn as diffusers draws it (every step).
        Returns:
            SchedulerOutput(prev_sample, pred_original_sample), or that tuple with return_dict=False.
        """
        model_output, sample, sigma, sigma_next = self._begin_step(model_output, timestep, sample, guidance_scale)
        # 1. x̂0 = D(x; σ)
        x0_pred = x0_from_sigma(model_output, sample, sigma, self.config.prediction_type)
        # 2. split σ_{i+1}² = σ_down² + σ_up², σ_up² = σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        # 3. Euler to σ_down: d = (x − x̂0)/σ, x ← x + (σ_down − σ)·d
        prev_sample = euler_step(sample, x0_pred, sigma, sigma_down)
        # 4. + σ_up·z
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        return self._end_step(prev_sample + noise * sigma_up, x0_pred, model_output.dtype, return_dict)
