"""Euler: the first-order solver of the probability-flow ODE dx/dσ = (x − x̂0)/σ in σ space (Karras et al. 2022,
Algorithm 2 with its optional churn), diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import Generator, randn_tensor
from fastdiff.schedulers.config import FINAL_SIGMAS_TYPES, SchedulerConfig, check_sigma_spacings
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_custom_timesteps,
    check_schedule_source,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
)
from fastdiff.schedulers.sigma import VarianceExplodingScheduler, x0_weights
from fastdiff.validation import check_choice, check_real


@dataclass(frozen=True)
class EulerDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    sigma_min: float | None = None  # Karras σ range; None: σ at the schedule's last / first timestep
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at training timestep 0)
    interpolation_type: str = "linear"  # σ at the timesteps: "linear" (interpolated) or "log_linear" (see below)
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ between sigma_min and sigma_max
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles (needs scipy)
    timestep_type: str = "discrete"  # "continuous": with v_prediction, the model sees t = ¼·log σ (EDM-style)

    def __post_init__(self):
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        super().__post_init__()
        check_real("sigma_min", self.sigma_min, positive=True, allow_none=True)
        check_real("sigma_max", self.sigma_max, positive=True, allow_none=True)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice("interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", self.timestep_type, ("discrete", "continuous"))


class EulerDiscreteScheduler(VarianceExplodingScheduler):
    """Euler sampler (Karras et al. 2022, Algorithm 2; first-order, with optional churn), diffusers-compatible;
    configured by :class:`EulerDiscreteConfig`. Timesteps are fp32 (fractional with "linspace" or Karras σ), as in
    diffusers."""

    config_class = EulerDiscreteConfig

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None) -> None:
        """Choose n timesteps (config.timestep_spacing, then Karras σ if asked), or take custom descending
        ``timesteps``, or custom ``sigmas`` (n + 1 values, the last one the final σ).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]), timesteps or sigmas.
        """
        cfg = self.settings
        source = check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        if source == "sigmas":
            sigmas = np.array(sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas).astype(np.float32)
            if sigmas.ndim != 1 or len(sigmas) < 2 or not np.isfinite(sigmas).all() or (sigmas < 0).any():
                raise ValueError(f"sigmas must be >= 2 finite values >= 0 (the last is the final σ), got {sigmas}")
            self._set_schedule(sigma_to_t(sigmas[:-1], self._log_sigmas), sigmas[:-1], sigmas[-1], device)
            return
        if source == "timesteps":
            continuous = cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction"
            schedule = check_custom_timesteps(timesteps, cfg.num_train_timesteps, np.float32, cfg.use_karras_sigmas,
                                              use_exponential_sigmas=cfg.use_exponential_sigmas,
                                              use_beta_sigmas=cfg.use_beta_sigmas,
                                              timestep_type=cfg.timestep_type if continuous else False)
        else:
            schedule = self._spaced_timesteps(num_inference_steps, np.float32, round_linspace=False)
        n = len(schedule)
        if cfg.interpolation_type == "linear":
            sigma_schedule = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        else:  # log_linear: n + 1 σ's log-spaced over the whole training range, as diffusers makes them (one more σ
            # than timesteps: the schedule then ends at σ_min, not at the final σ)
            ends = torch.tensor(np.log(self._train_sigmas[[-1, 0]]), dtype=torch.float32)
            sigma_schedule = torch.linspace(float(ends[0]), float(ends[1]), n + 1).exp().numpy()
        spacing = (karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas if cfg.use_exponential_sigmas
                   else beta_sigmas if cfg.use_beta_sigmas else None)
        if spacing is not None:
            sigma_min = cfg.sigma_min if cfg.sigma_min is not None else float(sigma_schedule[-1])
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else float(sigma_schedule[0])
            sigma_schedule = spacing(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigma_schedule, self._log_sigmas)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            # t = ¼·log σ for every σ but the final one, from the fp32 σ's (diffusers' EDM-style timesteps)
            schedule = 0.25 * np.log(np.asarray(sigma_schedule, dtype=np.float32))
        self._set_schedule(schedule, sigma_schedule, self._last_sigma(cfg.final_sigmas_type), device)

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """One Euler step from σ_i to σ_{i+1}, with Karras' churn γ when s_churn > 0.

        The arguments every scheduler takes: see :class:`~fastdiff.schedulers.base.Scheduler` (generator: for the
        churn noise). Besides, s_churn, s_tmin, s_tmax, s_noise: Karras et al. 2022, Algorithm 2 (S_churn, S_tmin,
        S_tmax, S_noise). Returns x_{i+1} and x̂0.
        """
        model_output, sample, sigma, sigma_next, dtype = self._begin_step(model_output, timestep, sample,
                                                                          guidance_scale)
        # 1. churn: γ = min(S_churn/n, √2 − 1) for σ in [S_tmin, S_tmax]; σ̂ = (γ + 1)σ; x̂ = x + g·z,
        #    g = √(σ̂² − σ²)·S_noise
        gamma = min(s_churn / (len(self._sigma_list) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        inputs, g = [], 0.0
        if gamma > 0:
            inputs = [randn_tensor(sample.shape, generator, sample.device, dtype)]
            g = s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        # 2. x̂0 = D(x̂; σ̂) = a·x̂ + b·m (the v-prediction form takes σ, as in diffusers)
        a, b = x0_weights(sigma_hat if self.settings.prediction_type == "epsilon" else sigma,
                          self.settings.prediction_type)
        # 3. x_{i+1} = x̂ + (σ_{i+1} − σ̂)·(x̂ − x̂0)/σ̂ = (1 + r)·x̂ − r·x̂0, r = (σ_{i+1} − σ̂)/σ̂; one fused call
        r = (sigma_next - sigma_hat) / sigma_hat
        rows = [[a, b, *([a * g] if inputs else [])], [1.0 + r, 0.0, *([(1.0 + r) * g] if inputs else []), -r]]
        x0_pred, prev_sample = ops.linear_step(sample, model_output, inputs, coefficients=rows,
                                               guidance_scale=guidance_scale)
        return self._end_step(prev_sample, x0_pred.to(dtype), dtype, return_dict)
