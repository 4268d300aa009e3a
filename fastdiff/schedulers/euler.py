"""Euler: the first-order solver of the probability-flow ODE dx/dσ = (x − x̂0)/σ in σ space (Karras et al. 2022,
Algorithm 2 with its optional churn), diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from fastdiff.schedulers.base import (
    FINAL_SIGMAS_TYPES,
    Generator,
    SchedulerConfig,
    VarianceExplodingScheduler,
    check_num_inference_steps,
    euler_step,
    karras_sigmas,
    randn_tensor,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
)
from fastdiff.validation import check_bool, check_choice, check_real


@dataclass(frozen=True)
class EulerDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    sigma_min: float | None = None  # Karras σ range; None: σ at the schedule's last / first timestep
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at training timestep 0)

    UNSUPPORTED: ClassVar[dict] = {"interpolation_type": "linear", "use_exponential_sigmas": False,
                                   "use_beta_sigmas": False, "timestep_type": "discrete"}

    def __post_init__(self):
        if self.use_karras_sigmas is None:  # diffusers allows None for False
            object.__setattr__(self, "use_karras_sigmas", False)
        super().__post_init__()
        check_bool("use_karras_sigmas", self.use_karras_sigmas)
        check_real("sigma_min", self.sigma_min, positive=True, allow_none=True)
        check_real("sigma_max", self.sigma_max, positive=True, allow_none=True)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)


def euler_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """n fp32 timesteps, descending; "linspace" ones stay fractional (as in diffusers' Euler schedulers)."""
    return spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset,
                            round_linspace=False).astype(np.float32)


def x0_from_sigma(model_output: Tensor, sample: Tensor, sigma: float, prediction_type: str) -> Tensor:
    """The denoiser D(x; σ) = x̂0 for each model parameterisation, with x = x0 + σ·ε (VE) and the model fed
    x/√(σ² + 1): ε-prediction x − σ·ε̂; x0-prediction as is; v-prediction −σ/√(σ² + 1)·v̂ + x/(σ² + 1)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


class EulerDiscreteScheduler(VarianceExplodingScheduler):
    """Euler sampler (Karras et al. 2022, Algorithm 2; first-order, with optional churn), diffusers-compatible.

    Keyword arguments: the fields of :class:`EulerDiscreteConfig` (diffusers' names and defaults). Timesteps are
    fp32 (fractional with "linspace" or Karras σ), as in diffusers. Errors: ValueError naming the argument for a bad
    value; TypeError for an unknown keyword.
    """

    config_class = EulerDiscreteConfig

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None) -> None:
        """Choose n timesteps (config.timestep_spacing, then Karras σ if asked), or take custom descending
        ``timesteps``, or custom ``sigmas`` (n + 1 values, the last one the final σ).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]), timesteps or sigmas.
        """
        cfg = self.config
        T = cfg.num_train_timesteps
        if sum(v is not None for v in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError("custom timesteps cannot be combined with use_karras_sigmas=True")
        if sigmas is not None:
            sigmas = np.array(sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas).astype(np.float32)
            if sigmas.ndim != 1 or len(sigmas) < 2 or not np.isfinite(sigmas).all() or (sigmas < 0).any():
                raise ValueError(f"sigmas must be >= 2 finite values >= 0 (the last is the final σ), got {sigmas}")
            self._set_schedule(sigma_to_t(sigmas[:-1], self._log_sigmas), sigmas[:-1], sigmas[-1], device)
            return
        if timesteps is not None:
            schedule = np.array(timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps).astype(np.float32)
            if schedule.size == 0 or (np.diff(schedule) >= 0).any() or schedule[0] > T - 1 or schedule[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T - 1}], "
                                 f"got {schedule.tolist()}")
            n = len(schedule)
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            schedule = euler_timesteps(cfg, n)
            if schedule.max() > T - 1:
                raise ValueError(f"steps_offset={cfg.steps_offset} puts timestep {schedule.max()} outside [0, {T})")
        sigma_schedule = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        if cfg.use_karras_sigmas:
            sigma_min = cfg.sigma_min if cfg.sigma_min is not None else float(sigma_schedule[-1])
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else float(sigma_schedule[0])
            sigma_schedule = karras_sigmas(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigma_schedule, self._log_sigmas)
        self._set_schedule(schedule, sigma_schedule, self._last_sigma(cfg.final_sigmas_type), device)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generator = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
    ):
        """One Euler step from σ_i to σ_{i+1}, with Karras' churn γ when s_churn > 0.

        Args:
            model_output: the model's prediction (config.prediction_type), sample's shape; with guidance_scale,
                (2B, ...) = [uncond; cond], combined in torch first.
            timestep: the current entry of ``timesteps`` (a number or a scalar tensor).
            sample: x at σ_i (unscaled), (B, ...).
            s_churn, s_tmin, s_tmax, s_noise: Karras et al. 2022, Algorithm 2 (S_churn, S_tmin, S_tmax, S_noise).
            generator: torch.Generator (or one per sample) for the churn noise, drawn as diffusers draws it.
        Returns:
            SchedulerOutput(prev_sample, pred_original_sample), or that tuple with return_dict=False.
        """
        model_output, sample, sigma, sigma_next = self._begin_step(model_output, timestep, sample, guidance_scale)
        # 1. churn: γ = min(S_churn/n, √2 − 1) for σ in [S_tmin, S_tmax]; σ̂ = (γ + 1)σ; x̂ = x + √(σ̂² − σ²)·S_noise·z
        gamma = min(s_churn / (len(self._sigma_list) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        # 2. x̂0 = D(x̂; σ̂) (the v-prediction form takes σ, as in diffusers)
        sigma_x0 = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        x0_pred = x0_from_sigma(model_output, sample, sigma_x0, self.config.prediction_type)
        # 3. d = (x̂ − x̂0)/σ̂; x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d
        prev_sample = euler_step(sample, x0_pred, sigma_hat, sigma_next)
        return self._end_step(prev_sample, x0_pred, model_output.dtype, return_dict)
