"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"), the multistep
"ρAB-DEIS" solver with log-ρ polynomial extrapolation, orders 1–3, diffusers' DEISMultistepScheduler: the noise
prediction ε̂ is extrapolated by a Lagrange polynomial in log ρ (ρ = σ/α, the variance-exploding noise level) through
the last 1–3 steps and integrated exactly over the step (eq. 14 with the ρ reparameterisation of §4).

Each step() is one :func:`fastdiff.ops.linear_step` call: output 0 the ε̂ the solver stores (re-derived from x̂0 as
diffusers does; with thresholding output 0 is the thresholded x̂0 and output 1 that ε̂), the last output the next
sample (coefficients computed here in float64 from the σ table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import check_step_inputs
from fastdiff.schedulers.config import SchedulerConfig, check_sigma_spacings, check_thresholding
from fastdiff.schedulers.dpm_singlestep import conversion_rows, drop_fixed, fix_fields, fused_linear_step, substitute
from fastdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler, alpha_sigma
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_num_inference_steps,
    check_steps_offset,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
)
from fastdiff.schedulers.sigma import SigmaScheduler
from fastdiff.validation import check_choice


@dataclass(frozen=True)
class DEISMultistepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # "leading" here is ⌊T/(n + 1)⌋-spaced, as in diffusers' DEIS
    solver_order: int = 2  # 1, 2 or 3 (3 for unconditional sampling, 2 for guided)
    algorithm_type: str = "deis"  # the only one ("dpmsolver", "dpmsolver++" of other configs map to it)
    solver_type: str = "logrho"  # the only one ("midpoint", "heun", "bh1", "bh2" of other configs map to it)
    lower_order_final: bool = True  # lower orders for the last two steps when there are fewer than 15 steps
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ over the training range
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles over the training range (needs scipy)

    thresholding: bool = False  # dynamic thresholding of x̂0 (Saharia et al. 2022)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    UNSUPPORTED: ClassVar[dict] = {"use_flow_sigmas": False, "use_dynamic_shifting": False}
    INERT: ClassVar[tuple] = ("flow_shift", "time_shift_type")
    # a common field diffusers' DEISMultistepScheduler does not have: held at this value, a given value ignored
    FIXED: ClassVar[dict] = {"rescale_betas_zero_snr": False}

    def __post_init__(self):
        fix_fields(self, self.FIXED)
        # what diffusers maps when it builds DEIS from a DPM-Solver or UniPC config (from_config across compatibles)
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
            object.__setattr__(self, "algorithm_type", "deis")
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "logrho")
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        super().__post_init__()
        check_thresholding(self)
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ("deis",))
        check_choice("solver_type", self.solver_type, ("logrho",))


def logrho_weights(rho_t: float, rhos: list[float]) -> list[float]:
    """∫ from ρ_s0 to ρ_t of the Lagrange basis polynomials in log ρ through ``rhos`` = [ρ_s0, ρ_s1(, ρ_s2)]
    (Zhang & Chen 2023, eq. 14 in ρ): the weight of each stored ε̂ in x_t/α_t = x_s/α_s + Σ w_j·ε̂_j. Closed forms
    of ∫ ℓ_j(log ρ) dρ = ρ·P(log ρ) for the linear (2 points) and quadratic (3 points) basis."""
    logs = [math.log(r) for r in rhos]

    def antiderivative(rho: float, j: int) -> float:
        u = math.log(rho)
        others = [logs[k] for k in range(len(logs)) if k != j]
        denominator = math.prod(logs[j] - o for o in others)
        if len(others) == 1:  # ∫ (u − c) dρ = ρ·(u − c − 1)
            return rho * (u - others[0] - 1.0) / denominator
        c, d = others  # ∫ (u − c)(u − d) dρ = ρ·((u − c)(u − d) − (2u − c − d) + 2)
        return rho * ((u - c) * (u - d) - (2 * u - c - d) + 2.0) / denominator

    return [antiderivative(rho_t, j) - antiderivative(rhos[0], j) for j in range(len(rhos))]


class DEISMultistepScheduler(SigmaScheduler):
    """Multistep DEIS (Zhang & Chen 2023; log-ρ, orders 1–3), diffusers-compatible; configured by
    :class:`DEISMultistepConfig`. ``model_outputs`` holds ε̂ of the last solver_order steps; timesteps are int64."""

    config_class = DEISMultistepConfig
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**drop_fixed(self.config_class, kwargs))
        self.timesteps = self.timesteps.to(torch.int64)
        self._timestep_list = self.timesteps.tolist()
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.settings.solver_order  # ε̂ of the last steps
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order

    add_noise = DPMSolverMultistepScheduler.add_noise
    scale_model_input = DPMSolverMultistepScheduler.scale_model_input

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None) -> None:
        """Choose n timesteps (config.timestep_spacing; "leading" spaces n + 1 points ⌊T/(n + 1)⌋ apart and drops
        the smallest, as diffusers' DEIS does), or Karras / exponential / beta σ's. The σ after the last step is σ at
        training timestep 0, or for the σ spacings their last σ again (a last step of length 0, as in diffusers).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]), steps_offset, or mu (dynamic
        shifting is not supported).
        """
        if mu is not None:
            raise ValueError(f"mu={mu!r} needs use_dynamic_shifting, which fastdiff does not support")
        cfg = self.settings
        T = cfg.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        if cfg.timestep_spacing == "leading":
            schedule = (np.arange(0, n + 1) * (T // (n + 1)))[::-1][:-1] + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            schedule = spaced_timesteps("trailing", T, n)
        else:
            schedule = spaced_timesteps("linspace", T, n + 1)[:-1]
        schedule = check_steps_offset(schedule.astype(np.int64), T, cfg.steps_offset)
        sigma_min, sigma_max = float(self._train_sigmas[0]), float(self._train_sigmas[-1])
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            spacing = (karras_sigmas if cfg.use_karras_sigmas else
                       exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas)
            sigmas = spacing(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)
            if cfg.use_karras_sigmas:  # the others are truncated to int64, as diffusers does
                schedule = schedule.round()
            sigma_last = float(sigmas[-1])
        else:
            sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
            sigma_last = sigma_min
        self._set_schedule(schedule, sigmas, sigma_last, device, torch.int64)
        self._reset_history()

    def convert_model_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """ε̂ at the current σ, always through x̂0 as diffusers forms it: x̂0 from the model output (its
        prediction_type), dynamically thresholded if config.thresholding, then ε̂ = (x − α_t·x̂0)/σ_t. fp32."""
        cfg = self.settings
        alpha, sigma = alpha_sigma(self._sigma_list[self._step_index])
        rows = conversion_rows(cfg.prediction_type, "eps-via-x0", alpha, sigma, cfg.thresholding)
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        return fused_linear_step(sample, model_output, {}, rows, threshold=threshold)[-1]

    def step_order(self, i: int) -> int:
        """The order step ``i`` may use (diffusers' rule): at most solver_order and the steps taken so far
        (lower_order_nums), and with lower_order_final under 15 steps first order for the last step and at most
        second for the one before."""
        n, cfg = len(self._timestep_list), self.settings
        short = cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or (short and i == n - 1):
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or (short and i == n - 2):
            return 2
        return 3

    def update_coefficients(self, order: int) -> dict[str, float]:
        """x_t as coefficients of "x" (this sample), "m0" (this step's ε̂), "m1", "m2" (the last steps' ε̂), float64.

        Order 1: x_t = (α_t/α_s)·x − σ_t·(e^h − 1)·ε̂_0, h = λ_t − λ_s (the first-order exponential integrator);
        orders 2–3: x_t = α_t·(x/α_s0 + Σ_j w_j·ε̂_j) with the log-ρ weights of :func:`logrho_weights`. A repeated
        σ among the stored steps (a zero-width interpolation) takes the first-order step (diffusers divides by
        zero there)."""
        i = self._step_index
        rhos = [self._sigma_list[i - j] for j in range(order)]  # ρ = σ_VP/α = σ (VE) at s0, s1, s2
        if order > 1 and len(set(rhos)) < order:
            order, rhos = 1, rhos[:1]
        alpha_t, sigma_t = alpha_sigma(self._sigma_list[i + 1])
        alpha_s, sigma_s = alpha_sigma(rhos[0])
        if order == 1:
            h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))
            return {"x": alpha_t / alpha_s, "m0": -sigma_t * math.expm1(h)}
        weights = logrho_weights(self._sigma_list[i + 1], rhos)
        return {"x": alpha_t / alpha_s, **{f"m{j}": alpha_t * w for j, w in enumerate(weights)}}

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             generator=None, guidance_scale: float | None = None):
        """One multistep DEIS step from σ_s (this timestep) to σ_t (the next one).

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (DEIS draws no noise: ``generator``, a
        keyword diffusers' DEIS does not have, is accepted and unused, so that pipelines may pass it to every
        scheduler). Returns x_t only, as diffusers' DEIS does: a SchedulerOutput whose only field is
        prev_sample, or with return_dict=False (prev_sample,). Raises ValueError (model_output's shape), TypeError
        (non-tensors), TimestepsNotSetError.
        """
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        cfg = self.settings
        order = self.step_order(i)
        # 1. ε̂ at this σ (through x̂0), and x_t from it and the stored ε̂'s: one fused op
        alpha, sigma = alpha_sigma(self._sigma_list[i])
        rows = conversion_rows(cfg.prediction_type, "eps-via-x0", alpha, sigma, cfg.thresholding)
        coefficients = self.update_coefficients(order)
        # x_t from (x, m) (or the thresholded x̂0), not from the rounded ε̂/x̂0: the float64 coefficients then cancel
        # what fp32 arithmetic would not
        coefficients = substitute(coefficients, "m0", rows[-1][1])
        inputs = {f"m{j}": self.model_outputs[-j] for j in range(1, order)}
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        outs = fused_linear_step(sample, model_output, inputs, [*rows, ("prev_sample", coefficients)],
                                 guidance_scale, threshold)
        # 2. the history
        self.model_outputs = self.model_outputs[1:] + [outs[-2]]
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        out = self._end_step(outs[-1], None, model_output.dtype, return_dict)
        return out if return_dict else out[:1]  # (prev_sample,), as diffusers' DEIS returns
