"""DDPM: ancestral sampling of the learned reverse chain (Ho et al. 2020), through the fused fastdiff.ops.ddpm_step."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import (
    Generator,
    SchedulerConfig,
    FusedStep,
    SchedulerOutput,
    VariancePreservingScheduler,
    as_float,
    broadcast_to,
    check_step_inputs,
    randn_tensor,
)
from fastdiff.validation import VARIANCE_TYPES, check_bool, check_choice, check_real



@dataclass(frozen=True)
class DDPMConfig(SchedulerConfig):
    variance_type: str = "fixed_small"  # σ_t² = β̃_t, the posterior variance ("fixed_small") or β_t ("fixed_large")
    clip_sample: bool = True  # clamp the predicted x0 to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0

    UNSUPPORTED: ClassVar[dict] = {"thresholding": False}
    INERT: ClassVar[tuple] = ("dynamic_thresholding_ratio", "sample_max_value")

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        check_bool("clip_sample", self.clip_sample)
        check_real("clip_sample_range", self.clip_sample_range, positive=True)


class DDPMScheduler(VariancePreservingScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020, Algorithm 2), diffusers-compatible.

    Keyword arguments: the fields of :class:`DDPMConfig` (diffusers' names and defaults). Errors: ValueError naming
    the argument for a bad value; TypeError for an unknown keyword.
    """

    config_class = DDPMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.custom_timesteps = False
        self._timestep_list: list[int] = self.timesteps.tolist()

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the n timesteps to sample with (config.timestep_spacing), or take custom descending ``timesteps``.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or timesteps (not descending in [0, T)).
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            steps = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
            if not steps or any(b >= a for a, b in itertools.pairwise(steps)) or steps[0] >= T or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T}), got {steps}")
            schedule = np.array(steps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps must be given (or custom timesteps)")
            schedule = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
        self.num_inference_steps = len(schedule)
        self.timesteps = torch.from_numpy(schedule).to(device)
        self._timestep_list = schedule.tolist()

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the schedule, −1 after the last (then ᾱ_prev = 1)."""
        t = int(as_float(timestep))
        if self.num_inference_steps is None:
            return t - 1
        try:
            i = self._timestep_list.index(t)
        except ValueError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self._timestep_list}") from None
        return self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else -1

    def fused_step(self, timestep, sample: Tensor, generator: Generator = None) -> FusedStep:
        """Steps 1–2 of :meth:`step` (ᾱ_t, ᾱ_prev, z), as the plan of one fused ``ops.ddpm_step`` call."""
        self._require_timesteps()
        # 1. t, the previous timestep, and ᾱ at both
        t = self._check_timestep_range(int(as_float(timestep)))
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self._alphas_cumprod_list[t]
        alpha_prod_t_prev = self._alphas_cumprod_list[prev_t] if prev_t >= 0 else 1.0
        # 2. z ~ N(0, I) for every t > 0 (diffusers' rule, kept so that seeds carry over)
        noise = None
        if t > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        options = {"variance_type": self.config.variance_type, "prediction_type": self.config.prediction_type,
                   "clip_sample_range": self.config.clip_sample_range if self.config.clip_sample else None}
        return FusedStep("ddpm_step", alpha_prod_t, alpha_prod_t_prev, noise, options)

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
        """x_t → x_{t−1} ~ N(μ̃(x_t, x̂0), σ_t²I) (Ho et al. 2020, eqs. 6–7), fused in fastdiff.ops.ddpm_step.

        Args:
            model_output: the model's prediction (config.prediction_type), sample's shape; with guidance_scale,
                (2B, ...) = [uncond; cond], combined as uncond + s·(cond − uncond) inside the fused step.
            timestep: t, an int or a scalar tensor from ``timesteps``.
            sample: x_t, (B, ...) fp32/fp16/bf16.
            generator: torch.Generator (or one per sample) for z; drawn as diffusers draws it, for t > 0.
        Returns:
            SchedulerOutput(prev_sample=x_{t−1}, pred_original_sample=x̂0), or that tuple with return_dict=False.
        """
        self._require_timesteps()
        check_step_inputs(model_output, sample, guidance_scale)
        if model_output.dtype != sample.dtype:  # the fused ops take one dtype
            model_output = model_output.to(sample.dtype)
        plan = self.fused_step(timestep, sample, generator)
        # 3. x̂0 from the model output, clipped; posterior mean μ̃_t(x_t, x̂0) (eq. 7); + σ_t·z — one fused op
        prev_sample, x0_pred = plan.run(sample, model_output, guidance_scale)
        if not return_dict:
            return prev_sample, x0_pred
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022, §4)."""
        alpha_prod = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha_prod_t = broadcast_to(alpha_prod[torch.as_tensor(timesteps, device=sample.device).long()], sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample
