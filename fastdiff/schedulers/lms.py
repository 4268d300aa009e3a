"""Linear multistep (LMS): the Adams–Bashforth family applied to the probability-flow ODE dx/dσ = (x − x̂0)/σ in σ
space (Karras et al. 2022, eq. 3; k-diffusion's ``sample_lms``), diffusers' LMSDiscreteScheduler.

Each step integrates the Lagrange polynomial through the last ``order`` derivatives d_k exactly:
x_{i+1} = x_i + Σ_k c_k·d_{i−k}, c_k = ∫_{σ_i}^{σ_{i+1}} ℓ_k(τ) dτ, with ℓ_k the Lagrange basis polynomial of σ_{i−k} on
the nodes σ_i, …, σ_{i−order+1}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import check_step_inputs
from fastdiff.schedulers.config import SchedulerConfig, check_sigma_spacings, load_config_mapping
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_num_inference_steps,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
)
from fastdiff.schedulers.sigma import VarianceExplodingScheduler
from fastdiff.validation import check_int

MAX_LMS_ORDER = 7  # the newest derivative is computed in the step; the 6 older ones are linear_step's 6 inputs


@dataclass(frozen=True)
class LMSDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7), between the schedule's ends
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ between the schedule's ends
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles (needs scipy)

    def __post_init__(self):
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        super().__post_init__()
        refuse_zero_snr(self, "LMSDiscreteScheduler")


def refuse_zero_snr(config: SchedulerConfig, name: str) -> None:
    """ValueError for rescale_betas_zero_snr=True: diffusers' ``name`` has no such option (its constructor refuses the
    keyword; its from_config ignores the key, as :func:`without_zero_snr` does)."""
    if config.rescale_betas_zero_snr:
        raise ValueError(f"rescale_betas_zero_snr=True is not supported by {name} (diffusers' has no such option)")


def without_zero_snr(config, kwargs: dict) -> tuple[Mapping, dict]:
    """A config (any form from_config takes) and from_config keywords without rescale_betas_zero_snr, which
    diffusers' LMS and PNDM do not know and so ignore when they load another scheduler's config: dropped here too, so
    that a zero-SNR DDIM config loads as it loads in diffusers."""
    mapping = {k: v for k, v in load_config_mapping(config).items() if k != "rescale_betas_zero_snr"}
    return mapping, {k: v for k, v in kwargs.items() if k != "rescale_betas_zero_snr"}


def lagrange_integral(nodes: list[float], k: int, lower: float, upper: float) -> float:
    """∫_lower^upper ℓ_k(τ) dτ, ℓ_k(τ) = Π_{j≠k} (τ − nodes[j])/(nodes[k] − nodes[j]), the Lagrange basis polynomial
    of node k, exactly (to rounding) and without scipy: ℓ_k has degree len(nodes) − 1, and Gauss–Legendre with
    p = len(nodes)//2 + 1 points integrates polynomials up to degree 2p − 1 ≥ len(nodes) − 1 exactly. In float64."""
    x, w = np.polynomial.legendre.leggauss(len(nodes) // 2 + 1)
    half, mid = 0.5 * (upper - lower), 0.5 * (upper + lower)
    tau = mid + half * x
    basis = np.ones_like(tau)
    for j, node in enumerate(nodes):
        if j != k:
            basis *= (tau - node) / (nodes[k] - node)
    return float(half * np.dot(w, basis))


class LMSDiscreteScheduler(VarianceExplodingScheduler):
    """Linear multistep sampler in σ space (k-diffusion's LMS), diffusers-compatible; configured by
    :class:`LMSDiscreteConfig`. Timesteps are fp32 (fractional with "linspace" or the σ spacings), as in diffusers.

    State, as diffusers names it: ``derivatives``, the d = (x − x̂0)/σ of the last steps (oldest first, fp32), reset by
    set_timesteps.
    """

    config_class = LMSDiscreteConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # diffusers builds the schedule of all T steps at construction (num_inference_steps = T until set_timesteps)
        self.set_timesteps(self.settings.num_train_timesteps)

    @classmethod
    def from_config(cls, config, **kwargs):
        """As :meth:`Scheduler.from_config`, ignoring rescale_betas_zero_snr as diffusers' LMS does."""
        mapping, kwargs = without_zero_snr(config, kwargs)
        return super().from_config(mapping, **kwargs)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose n timesteps (config.timestep_spacing), σ interpolated at them, then respaced by the Karras,
        exponential or beta σ spacing if one is on (between the interpolated σ's ends); the final σ is 0.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]).
        """
        cfg = self.settings
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        # a steps_offset that pushes "leading" timesteps to T is allowed, as in diffusers: σ there is σ_{T−1} (np.interp
        # holds the end value), and the timestep only labels the step (the model sees it as given)
        schedule = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset,
                                    round_linspace=False).astype(np.float32)
        sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        spacing = (karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas if cfg.use_exponential_sigmas
                   else beta_sigmas if cfg.use_beta_sigmas else None)
        if spacing is not None:
            sigmas = spacing(float(sigmas[-1]), float(sigmas[0]), n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)
        self._set_schedule(schedule, sigmas, 0.0, device)
        self.derivatives: list[Tensor] = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c = ∫_{σ_t}^{σ_{t+1}} ℓ(τ) dτ, ℓ the Lagrange basis polynomial of σ_{t−current_order} on the nodes
        σ_t, σ_{t−1}, …, σ_{t−order+1} (diffusers' name and arguments; exact, in float64, where diffusers integrates
        numerically with scipy)."""
        nodes = [self._sigma_list[t - k] for k in range(order)]
        return lagrange_integral(nodes, current_order, self._sigma_list[t], self._sigma_list[t + 1])

    def step(self, model_output: Tensor, timestep, sample: Tensor, order: int = 4, return_dict: bool = True, *,
             guidance_scale: float | None = None):
        """One linear multistep step from σ_i to σ_{i+1}, in one fused ``fastdiff.ops.linear_step`` call.

        The arguments every scheduler takes: see :class:`~fastdiff.schedulers.base.Scheduler`. Besides, order: the
        number of derivatives the step combines (at most the steps taken so far, and 1 ≤ order ≤ 7; diffusers'
        default 4). Returns x_{i+1} and x̂0. Raises ValueError for an order outside [1, 7] or mismatched shapes.
        """
        order = check_int("order", order, minimum=1, maximum=MAX_LMS_ORDER)
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        cfg = self.settings
        sigma = self._sigma_list[i]
        # 1. the history after this step (diffusers' rule: append, then drop the oldest once if more than `order`)
        #    and the derivatives the update combines: the newest first, as many as the order this step may use
        history = list(self.derivatives)
        kept = history[1:] if len(history) + 1 > order else history
        step_order = min(i + 1, order)
        older = kept[::-1][: step_order - 1]  # d_{i−1}, d_{i−2}, … (the newest, d_i, is computed below)
        coeffs = [self.get_lms_coefficient(step_order, i, k) for k in range(1 + len(older))]
        # 2. x̂0 = a·x + b·m = D(x; σ) for the prediction type (x = x0 + σ·ε, the model fed x/√(σ² + 1))
        if cfg.prediction_type == "epsilon":
            a, b = 1.0, -sigma
        elif cfg.prediction_type == "sample":
            a, b = 0.0, 1.0
        else:  # v_prediction
            a, b = 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
        # 3. d_i = (x − x̂0)/σ = (1 − a)/σ·x − b/σ·m, formed from x and m (for ε-prediction d_i = m exactly)
        # ((1 − a)/σ = σ/(σ² + 1) for v-prediction, formed without the difference)
        d_x = sigma / (sigma**2 + 1) if cfg.prediction_type == "v_prediction" else (1.0 - a) / sigma
        d_m = -b / sigma
        # 4. x_{i+1} = x + c_0·d_i + Σ_{k≥1} c_k·d_{i−k}, with c_0·d_i expanded into x and m: where σ_{i+1} ≪ σ_i the
        #    terms x and c_0·d_i nearly cancel, and (1 + c_0·d_x) computed in float64 keeps that exact
        pad = [0.0] * len(older)
        rows = [[a, b, *pad], [d_x, d_m, *pad, 0.0], [1.0 + coeffs[0] * d_x, coeffs[0] * d_m, *coeffs[1:], 0.0, 0.0]]
        dtype = model_output.dtype
        work = torch.promote_types(sample.dtype, model_output.dtype)
        x0_pred, derivative, prev_sample = ops.linear_step(
            sample.to(work), model_output.to(work), older, coefficients=rows, guidance_scale=guidance_scale)
        self.derivatives = kept + [derivative]
        return self._end_step(prev_sample, x0_pred.to(dtype), dtype, return_dict)
