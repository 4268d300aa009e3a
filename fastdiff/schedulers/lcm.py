"""LCM: the multistep sampler of latent consistency models (Luo et al. 2023, Algorithm 1). A consistency model maps
any x_t straight to an estimate of x0; sampling in a few steps alternates that map with fresh noise:
x_{t'} = √ᾱ_{t'}·f(x_t, t) + √(1 − ᾱ_{t'})·z, with f(x, t) = c_skip(t)·x + c_out(t)·x̂0 (the boundary-condition
parameterisation: f(x, 0) = x). diffusers' LCMScheduler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import (
    Generator,
    SchedulerOutput,
    StepCounter,
    check_step_inputs,
    randn_tensor,
)
from fastdiff.schedulers.config import ClipSampleConfig
from fastdiff.schedulers.schedules import check_num_inference_steps, check_schedule_source
from fastdiff.schedulers.vp import VariancePreservingScheduler
from fastdiff.validation import check_int, check_real

logger = logging.getLogger("fastdiff.schedulers")

SIGMA_DATA = 0.5  # σ_data of the boundary-condition scalings (Song et al. 2023, §3; LCM keeps 0.5)


@dataclass(frozen=True)
class LCMConfig(ClipSampleConfig):
    beta_start: float = 0.00085  # latent-diffusion β range (Stable Diffusion's)
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50  # the distillation solver's schedule: timesteps k·i − 1, k = T // this
    clip_sample: bool = False
    set_alpha_to_one: bool = True  # ᾱ after a step past timestep 0: 1 or ᾱ_0
    timestep_scaling: float = 10.0  # t is multiplied by this inside c_skip and c_out

    def __post_init__(self):
        super().__post_init__()
        check_int("original_inference_steps", self.original_inference_steps, minimum=1)
        check_real("timestep_scaling", self.timestep_scaling, nonneg=True)


class LCMSchedulerOutput(SchedulerOutput):
    """What LCMScheduler.step() returns: ``prev_sample`` (the next model input) and ``denoised`` (the consistency
    function's estimate f(x_t, t) of x0), as diffusers' LCMSchedulerOutput."""

    FIELDS = ("prev_sample", "denoised")


def boundary_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) at t (Song et al. 2023, eq. 5 with σ_data = 0.5, t scaled by ``timestep_scaling``):
    c_skip = σ_d²/(τ² + σ_d²), c_out = τ/√(τ² + σ_d²), τ = t·scaling; c_skip → 1 and c_out → 0 as t → 0."""
    scaled = timestep * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)


class LCMScheduler(StepCounter, VariancePreservingScheduler):
    """Latent-consistency multistep sampler (Luo et al. 2023), diffusers-compatible; configured by :class:`LCMConfig`.

    The timesteps are picked from the distillation schedule (``original_inference_steps`` timesteps k·i − 1), evenly
    by index. Each step is one fused ``fastdiff.ops.linear_step``: x̂0 from the model output (clipped or
    thresholded), f = c_skip·x + c_out·x̂0, then x_{t'} = √ᾱ_{t'}·f + √(1 − ᾱ_{t'})·z (no noise at the last step).
    """

    config_class = LCMConfig
    compatible_family = "lcm"  # diffusers lists LCMScheduler as compatible with itself only

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.final_alpha_cumprod = 1.0 if self.settings.set_alpha_to_one else self._alphas_cumprod_list[0]
        self.custom_timesteps = False

    @property
    def has_fused_step(self) -> bool:
        """False: LCM's update is one ``ops.linear_step`` call inside step(), not a DDIM/DDPM fused-step plan."""
        return False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      original_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                      strength: float = 1.0) -> None:
        """Choose n timesteps from the LCM schedule, or take custom descending ``timesteps``.

        The LCM schedule: k = T // original_inference_steps, the candidates k·i − 1 for i = 1 … ⌊orig·strength⌋
        (descending), and n of them at indices ⌊j·len/n⌋. ``strength`` < 1 keeps the low-noise part (image to
        image); with custom timesteps it drops the first (1 − strength) share of them.

        Raises ValueError naming num_inference_steps (not an integer in [1, T], more than the candidates),
        original_inference_steps (> T), strength (not in (0, 1]) or timesteps (not descending, not below T).
        """
        cfg = self.settings
        T = cfg.num_train_timesteps
        source = check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps)
        original_steps = cfg.original_inference_steps if original_inference_steps is None else original_inference_steps
        original_steps = check_int("original_inference_steps", original_steps, minimum=1)
        if original_steps > T:
            raise ValueError(f"original_inference_steps={original_steps} cannot exceed num_train_timesteps={T}")
        strength = check_real("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        k = T // original_steps
        candidates = np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1  # ascending
        if source == "timesteps":
            schedule = self._custom_timesteps(timesteps, candidates, original_steps, strength)
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            if n > original_steps:
                raise ValueError(f"num_inference_steps={n} cannot exceed original_inference_steps={original_steps}: "
                                 f"the timesteps are a subset of that schedule")
            if len(candidates) < n:
                raise ValueError(f"num_inference_steps={n} is more than the {len(candidates)} timesteps "
                                 f"original_inference_steps × strength = {original_steps} × {strength} leaves; lower "
                                 f"num_inference_steps or raise strength")
            self.num_inference_steps = n
            indices = np.floor(np.linspace(0, len(candidates), num=n, endpoint=False)).astype(np.int64)
            schedule = candidates[::-1][indices]
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.ascontiguousarray(schedule)).to(device=device, dtype=torch.int64)
        self._timestep_list = self.timesteps.tolist()
        self._step_index = None
        self._begin_index = None

    def _custom_timesteps(self, timesteps, candidates: np.ndarray, original_steps: int, strength: float) -> np.ndarray:
        """User-given timesteps: descending, below T (ValueError naming timesteps); warnings (as diffusers logs them)
        where they do not start at T − 1, leave the distillation schedule or outnumber it. ``num_inference_steps``
        is their count before strength drops the first ones (diffusers' rule: the last step is the one at that
        index)."""
        T = self.settings.num_train_timesteps
        values = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
        try:
            schedule = np.array(values, dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"timesteps must be a list of integers, got {values!r}") from None
        if schedule.ndim != 1 or schedule.size == 0 or (np.diff(schedule) >= 0).any():
            raise ValueError(f"timesteps must be a non-empty strictly descending list, got {values}")
        if schedule[0] >= T or schedule[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T}), got {values}")
        if strength == 1.0 and schedule[0] != T - 1:
            logger.warning("custom timesteps start at %d, not at num_train_timesteps − 1 = %d", schedule[0], T - 1)
        off_schedule = sorted(set(schedule[1:].tolist()) - set(candidates.tolist()), reverse=True)
        if off_schedule:
            logger.warning("custom timesteps %s are not on the distillation schedule", off_schedule)
        if len(schedule) > original_steps:
            logger.warning("%d custom timesteps are more than original_inference_steps=%d", len(schedule),
                           original_steps)
        self.num_inference_steps = len(schedule)
        self.custom_timesteps = True
        kept = min(int(len(schedule) * strength), len(schedule))
        return schedule[len(schedule) - kept:]

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple[float, float]:
        """(c_skip, c_out) at ``timestep`` (see :func:`boundary_scalings`)."""
        return boundary_scalings(float(timestep), self.settings.timestep_scaling)

    def _x0_coefficients(self, alpha_prod_t: float) -> tuple[float, float]:
        """x̂0 = a·x + b·m for the model output m of each prediction type (x_t = √ᾱ·x0 + √(1 − ᾱ)·ε)."""
        sqrt_alpha, sqrt_beta = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
        prediction_type = self.settings.prediction_type
        if prediction_type == "epsilon":
            return 1.0 / sqrt_alpha, -sqrt_beta / sqrt_alpha
        if prediction_type == "sample":
            return 0.0, 1.0
        return sqrt_alpha, -sqrt_beta  # v_prediction

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """One LCM step: x̂0 from the model output (clipped / thresholded as configured), the consistency function
        f = c_skip(t)·x + c_out(t)·x̂0 (``denoised``), and x_{t'} = √ᾱ_{t'}·f + √(1 − ᾱ_{t'})·z for the next
        timestep t' (f itself at the last step, where no noise is drawn) — one fused ``ops.linear_step`` call.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (generator: for z). Returns
        LCMSchedulerOutput(prev_sample, denoised), or with return_dict=False that tuple; both in the model output's
        dtype.
        """
        self._require_timesteps()
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        cfg = self.settings
        t = self._timestep_list[i]
        prev_t = self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else t
        alpha_prod_t = self._alphas_cumprod_list[t]
        alpha_prod_prev = self._alphas_cumprod_list[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = boundary_scalings(t, cfg.timestep_scaling)
        a_x, a_m = self._x0_coefficients(alpha_prod_t)
        dtype = model_output.dtype
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        rows = [[a_x, a_m], [c_skip, 0.0, c_out]]  # x̂0; f = c_skip·x + c_out·x̂0
        inputs = []
        last = i == self.num_inference_steps - 1
        if not last:  # x_{t'} = √ᾱ_{t'}·f + √(1 − ᾱ_{t'})·z
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
            inputs = [noise]
            rows = [[a_x, a_m, 0.0], [c_skip, 0.0, 0.0, c_out],
                    [0.0, 0.0, math.sqrt(1.0 - alpha_prod_prev), 0.0, math.sqrt(alpha_prod_prev)]]
        bound = {"clip_sample_range": cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None,
                 "threshold": cfg.threshold()}
        outs = ops.linear_step(sample, model_output, inputs, coefficients=rows, guidance_scale=guidance_scale,
                               **bound)
        denoised = outs[1].to(dtype)
        prev_sample = denoised if last else outs[2].to(dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
