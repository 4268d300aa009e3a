"""Heun's method: the second-order solver of the probability-flow ODE dx/dσ = (x − x̂0)/σ in σ space (Karras et al.
2022, Algorithm 1 without churn), diffusers' HeunDiscreteScheduler.

Each step from σ_i to σ_{i+1} takes two model calls, so the schedule lists every timestep but the first twice and
step() alternates between two stages (diffusers' layout, which pipelines rely on through ``order = 2``):

1. at σ_i: d_i = (x_i − x̂0(x_i; σ_i))/σ_i and the Euler predictor x̃ = x_i + (σ_{i+1} − σ_i)·d_i;
2. at σ_{i+1}: d' = (x̃ − x̂0(x̃; σ_{i+1}))/σ_{i+1} and the corrector x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d')/2.

The last step (to σ = 0) is the Euler predictor alone. This module also holds what Heun shares with KDPM2
(:mod:`fastdiff.schedulers.kdpm2`): the config fields, the base schedule of n σ's, and x̂0 as a row of
``ops.linear_step`` coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import check_step_inputs
from fastdiff.schedulers.config import SchedulerConfig, check_sigma_spacings, load_config_mapping
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_custom_timesteps,
    check_num_inference_steps,
    check_schedule_source,
    check_steps_offset,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)
from fastdiff.schedulers.sigma import VarianceExplodingScheduler
from fastdiff.validation import check_int, check_real

SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


# --------------------------------------------------------------------------------------------- shared with KDPM2
@dataclass(frozen=True)
class TwoStageSigmaConfig(SchedulerConfig):
    """The fields Heun and KDPM2 share (diffusers' names and defaults: the Stable Diffusion β range, "linspace")."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles (needs scipy)

    def __post_init__(self):
        check_sigma_spacings(self, SIGMA_SPACINGS)
        super().__post_init__()
        if self.rescale_betas_zero_snr:
            # diffusers' Heun and KDPM2 have no such option (their σ_T would be infinite)
            raise ValueError(f"rescale_betas_zero_snr=True is not supported by {type(self).__name__} (diffusers' "
                             f"scheduler has no such option)")


class TwoStageSigmaScheduler(VarianceExplodingScheduler):
    """The σ-space samplers of order 2 that spend two model calls per step (Heun, KDPM2), as diffusers lays them
    out: ``timesteps`` lists each timestep but the first twice, ``sigmas`` is interleaved to match, step() alternates
    between a first and a second stage (``state_in_first_order``), keeping what the second stage needs in between.

    ``num_inference_steps`` is n (the steps), not len(timesteps) (the model calls), as in diffusers.
    """

    order = 2  # model calls per step (diffusers' name; pipelines size their progress bars by it)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        betas = self._own_betas()
        if betas is not None:  # a β schedule the shared tables do not know: the ᾱ and σ tables rebuilt from it
            self.betas = betas
            self.alphas = 1.0 - betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
            self._train_sigmas = train_sigmas(self.alphas_cumprod)
            self._log_sigmas = np.log(self._train_sigmas)
        # before set_timesteps: the schedule of T steps, as diffusers builds it at construction (add_noise and
        # init_noise_sigma read it); steps_offset may push a "leading" timestep to T there, as diffusers allows
        T = self.settings.num_train_timesteps
        self._set_two_stage_schedule(*self._base_schedule(T, None, T, check_offset=False), device=None)
        self._reset_stage()

    @classmethod
    def from_config(cls, config, **kwargs):
        """As :meth:`Scheduler.from_config`; rescale_betas_zero_snr (a key of other schedulers' configs) is ignored,
        as diffusers' Heun and KDPM2 ignore it."""
        mapping = {k: v for k, v in load_config_mapping(config).items() if k != "rescale_betas_zero_snr"}
        return super().from_config(mapping, **kwargs)

    # ----------------------------------------------------------------- the schedule
    def _base_schedule(self, num_inference_steps, timesteps, num_train_timesteps, check_offset: bool = True):
        """(timesteps, σ's) of the n steps before interleaving: the spaced (or custom) timesteps as fp32, σ at each
        interpolated from the training σ's, then re-spaced (Karras / exponential / beta) between the first and last
        of those σ's with the timesteps read back from σ (float64, unrounded)."""
        cfg = self.settings
        if timesteps is not None:
            schedule = check_custom_timesteps(timesteps, cfg.num_train_timesteps, np.float32, cfg.use_karras_sigmas,
                                              use_exponential_sigmas=cfg.use_exponential_sigmas,
                                              use_beta_sigmas=cfg.use_beta_sigmas)
        else:
            T = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
            n = check_num_inference_steps(num_inference_steps, T)
            schedule = spaced_timesteps(cfg.timestep_spacing, T, n, cfg.steps_offset, round_linspace=False)
            if check_offset:
                schedule = check_steps_offset(schedule, T, cfg.steps_offset)
            schedule = schedule.astype(np.float32)
        sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        spacing = (karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas if cfg.use_exponential_sigmas
                   else beta_sigmas if cfg.use_beta_sigmas else None)
        if spacing is not None:
            sigmas = spacing(float(sigmas[-1]), float(sigmas[0]), len(schedule))
            schedule = sigma_to_t(sigmas, self._log_sigmas)
        return schedule, sigmas

    def _own_betas(self) -> Tensor | None:
        """β's of a schedule only this scheduler knows (None: the shared tables stand)."""
        return None

    def _set_two_stage_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        """Lay out the n steps' (timesteps, σ's) for the two stages (each scheduler its own way)."""
        raise NotImplementedError

    def _reset_stage(self) -> None:
        """Forget what a first stage kept for the second."""
        raise NotImplementedError

    def _set_interleaved(self, timesteps, sigmas_long: Tensor, n: int, device,
                         timestep_dtype: torch.dtype = torch.float32) -> None:
        """Store the interleaved tables (``sigmas_long`` fp32, its last entry the final σ) and reset the counter."""
        sigmas_long = sigmas_long.numpy()
        self._set_schedule(timesteps, sigmas_long[:-1], float(sigmas_long[-1]), device, timestep_dtype)
        self.num_inference_steps = n

    @property
    def init_noise_sigma(self) -> Tensor:
        """σ of x_T: σ_max ("linspace"/"trailing"), or √(σ_max² + 1) ("leading"), a 0-dim fp32 CPU tensor formed in
        fp32 as diffusers forms it (the same last bit)."""
        sigma_max = torch.tensor(max(self._sigma_list), dtype=torch.float32)
        return sigma_max if self.settings.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    # ----------------------------------------------------------------- step() helpers
    def _x0_row(self, sigma: float) -> list[float]:
        """x̂0 = a·x + b·m as the row [a, b], for the model output m of each prediction type at σ (x = x0 + σ·ε, the
        model fed x/√(σ² + 1)): ε: x − σ·m; x0: m; v: x/(σ² + 1) − σ/√(σ² + 1)·m."""
        prediction_type = self.settings.prediction_type
        if prediction_type == "epsilon":
            return [1.0, -sigma]
        if prediction_type == "sample":
            return [0.0, 1.0]
        return [1.0 / (sigma**2 + 1.0), -sigma / math.sqrt(sigma**2 + 1.0)]

    def _derivative_row(self, sigma: float, clip: float | None) -> list[float]:
        """d = (x − x̂0)/σ as a row over (x, m, x̂0): straight from x and m where x̂0 is not clamped (no cancellation
        of x − x̂0: for ε-prediction d is m itself), else from the clamped x̂0."""
        if clip is not None:
            return [1.0 / sigma, 0.0, -1.0 / sigma]
        a, b = self._x0_row(sigma)
        return [(1.0 - a) / sigma, -b / sigma, 0.0]

    def _step_inputs(self, model_output: Tensor, timestep, sample: Tensor,
                     guidance_scale: float | None) -> tuple[Tensor, int]:
        """The start of step(): the inputs checked (ValueError for shapes, TypeError for types), the model output in
        the sample's dtype, and this call's index in the schedule."""
        check_step_inputs(model_output, sample, guidance_scale)
        if guidance_scale is not None:
            check_real("guidance_scale", guidance_scale)
        i = self._current_step(timestep)
        return model_output.to(sample.dtype), i


# --------------------------------------------------------------------------------------------- Heun
@dataclass(frozen=True)
class HeunDiscreteConfig(TwoStageSigmaConfig):
    clip_sample: bool = False  # clamp x̂0 to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0

    def __post_init__(self):
        exp = self.beta_schedule == "exp"  # ᾱ(t) = e^(−12t): Heun's own β schedule, which the base check refuses
        if exp:
            object.__setattr__(self, "beta_schedule", "linear")
        super().__post_init__()
        if exp:
            object.__setattr__(self, "beta_schedule", "exp")
        check_real("clip_sample_range", self.clip_sample_range, positive=True)


def exp_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) = e^(−12·t/T) (diffusers' "exp" schedule), fp32 (T,)."""
    T = num_train_timesteps
    return torch.tensor([min(1 - math.exp(-12.0 * (i + 1) / T) / math.exp(-12.0 * i / T), max_beta)
                         for i in range(T)], dtype=torch.float32)


class HeunDiscreteScheduler(TwoStageSigmaScheduler):
    """Heun's second-order sampler (Karras et al. 2022, Algorithm 1, no churn), diffusers-compatible; configured by
    :class:`HeunDiscreteConfig`. Timesteps are fp32, as in diffusers.

    Between the two stages of a step it keeps ``sample`` (x_i), ``prev_derivative`` (d_i) and ``dt``
    (σ_{i+1} − σ_i), diffusers' names; ``state_in_first_order`` is True when the next call is a first stage.
    """

    config_class = HeunDiscreteConfig

    def _own_betas(self) -> Tensor | None:
        cfg = self.settings
        return exp_betas(cfg.num_train_timesteps) if cfg.beta_schedule == "exp" and cfg.trained_betas is None else None

    def _reset_stage(self) -> None:
        self.prev_derivative: Tensor | None = None
        self.dt: float | None = None
        self.sample: Tensor | None = None
        self._predictor: Tensor | None = None  # x̃, the first stage's result

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is the first stage of a step (at σ_i)."""
        return self.dt is None

    def _set_two_stage_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        """timesteps [t_0, t_1, t_1, ..., t_{n−1}, t_{n−1}] (2n − 1) and sigmas [σ_0, σ_1, σ_1, ..., σ_{n−1},
        σ_{n−1}, 0] (2n): a second stage reads the σ of its first stage one place back."""
        n = len(timesteps)
        short = np.concatenate([np.asarray(sigmas, dtype=np.float64), [0.0]]).astype(np.float32)
        long = np.concatenate([short[:1], np.repeat(short[1:-1], 2), short[-1:]])
        times = np.asarray(timesteps)
        times = np.concatenate([times[:1], np.repeat(times[1:], 2)])
        self._set_interleaved(times, torch.from_numpy(long), n, device)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      num_train_timesteps: int | None = None, timesteps: Sequence[float] | None = None) -> None:
        """Choose n steps (config.timestep_spacing over ``num_train_timesteps`` training steps, default the config's;
        then Karras / exponential / beta σ if asked), or take custom descending ``timesteps``; lay them out for the
        two stages (see :meth:`_set_two_stage_schedule`).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]), timesteps, or steps_offset.
        """
        check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps)
        T = self.settings.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
        self._set_two_stage_schedule(*self._base_schedule(num_inference_steps, timesteps, T), device=device)
        self._reset_stage()

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             guidance_scale: float | None = None):
        """One stage of a Heun step (see the module docstring): the Euler predictor on a first stage, the trapezoidal
        corrector on a second; each is one ``ops.linear_step`` call.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (Heun draws no noise). Returns x_next (the
        predictor x̃ after a first stage, x_{i+1} after a second) and x̂0 at this stage's σ (clamped with
        config.clip_sample).
        """
        dtype = model_output.dtype
        model_output, i = self._step_inputs(model_output, timestep, sample, guidance_scale)
        cfg = self.settings
        clip = cfg.clip_sample_range if cfg.clip_sample else None
        if self.state_in_first_order:
            sigma, sigma_next = self._sigma_list[i], self._sigma_list[i + 1]
            dt = sigma_next - sigma
            # 1. x̂0 at σ_i; 2. d_i = (x − x̂0)/σ_i; 3. x̃ = x + (σ_{i+1} − σ_i)·d_i, straight from x and m where x̂0 is
            # not clamped (the coefficients combined in float64: x̃ = σ_{i+1}/σ_i·x + (1 − σ_{i+1}/σ_i)·m for
            # x0-prediction, where x + dt·d_i would cancel two terms of size |x|)
            d_row = self._derivative_row(sigma, clip)
            x_next = [1.0, 0.0, 0.0, dt] if clip is not None else [1.0 + dt * d_row[0], dt * d_row[1], 0.0, 0.0]
            rows = [self._x0_row(sigma), d_row, x_next]
            x0_pred, derivative, prev_sample = ops.linear_step(sample, model_output, [], coefficients=rows,
                                                               guidance_scale=guidance_scale, clip_sample_range=clip)
            self.prev_derivative, self.dt, self.sample, self._predictor = derivative, dt, sample, prev_sample
        else:
            sigma_next, dt = self._sigma_list[i], self.dt  # the stage's σ_{i+1}; σ_{i+1} − σ_i from the first stage
            # 1. x̂0 at σ_{i+1}; 2. d' = (x − x̂0)/σ_{i+1}; 3. x_{i+1} = x_i + dt·(d_i + d')/2, taken as
            # x̃ + dt/2·(d' − d_i) (x̃ = x_i + dt·d_i): no sum of two terms of size |x_i| that cancel, so fp32 keeps
            # the digits diffusers' form loses where σ_i is large (operands: x, m, d_i, x̃, x̂0)
            half = 0.5 * dt
            derivative = [c * half for c in self._derivative_row(sigma_next, clip)]
            rows = [self._x0_row(sigma_next) + [0.0, 0.0],
                    derivative[:2] + [-half, 1.0] + derivative[2:]]
            x0_pred, prev_sample = ops.linear_step(sample, model_output, [self.prev_derivative, self._predictor],
                                                   coefficients=rows, guidance_scale=guidance_scale,
                                                   clip_sample_range=clip)
            self._reset_stage()
        return self._end_step(prev_sample, x0_pred, dtype, return_dict)
