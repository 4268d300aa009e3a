"""Singlestep DPM-Solver (Lu et al. 2022a, Algorithms 1–2) and DPM-Solver++ (Lu et al. 2022b, Algorithm 1), orders
1–3, diffusers' DPMSolverSinglestepScheduler: the steps are taken in groups of ``order`` model calls; every step of a
group starts from the sample stored at the group's start, and its k-th step is a k-th order update in
half-log-SNR time λ = log(α_t/σ_t) that uses the model outputs taken so far in the group.

Each step() is one :func:`fastdiff.ops.linear_step` call: output 0 the converted model output (x̂0, or ε̂), output 1
the next sample (the coefficients computed here in float64 from the σ table).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import Generator, check_step_inputs, randn_tensor
from fastdiff.schedulers.config import (
    FINAL_SIGMAS_TYPES,
    SchedulerConfig,
    check_lambda_min_clipped,
    check_sigma_spacings,
    check_thresholding,
)
from fastdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler, alpha_sigma
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_custom_timesteps,
    check_num_inference_steps,
    check_schedule_source,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
)
from fastdiff.schedulers.sigma import SigmaScheduler
from fastdiff.validation import check_choice

logger = logging.getLogger("fastdiff.schedulers")

SOLVER_TYPES = ("midpoint", "heun")
ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


# --------------------------------------------------------------------------------------------- shared helpers
def fused_linear_step(sample: Tensor, model_output: Tensor, inputs: Mapping[str, Tensor],
                      outputs: Sequence[tuple[str, Mapping[str, float]]], guidance_scale: float | None = None,
                      threshold: tuple[float, float] | None = None) -> list[Tensor]:
    """One :func:`fastdiff.ops.linear_step` call written with named operands: ``x`` (sample), ``m`` (the model
    output, guided with ``guidance_scale``), the ``inputs`` by name, then the outputs by name. ``outputs`` is a list
    of (name, {operand name: coefficient}); an operand left out has coefficient 0. Output 0 is thresholded with
    ``threshold`` = (ratio, max_value). Returns the outputs (fp32, sample's shape) in order.

    sample and model_output are brought to one dtype first (the wider of the two), as linear_step wants."""
    dtype = torch.promote_types(sample.dtype, model_output.dtype)
    names = ["x", "m", *inputs]
    rows = []
    for name, combination in outputs:
        unknown = set(combination) - set(names)
        if unknown:  # a programming error in a scheduler, not a user error
            raise KeyError(f"output {name!r} reads unknown operands {sorted(unknown)}; operands are {names}")
        rows.append([float(combination.get(n, 0.0)) for n in names])
        names.append(name)
    return ops.linear_step(sample.to(dtype), model_output.to(dtype), list(inputs.values()), coefficients=rows,
                           guidance_scale=guidance_scale, threshold=threshold)


def combine(*terms: tuple[float, Mapping[str, float]]) -> dict[str, float]:
    """Σ c·v over (c, v) pairs of linear combinations written as {operand name: coefficient} dicts."""
    out: dict[str, float] = {}
    for c, combination in terms:
        for name, value in combination.items():
            out[name] = out.get(name, 0.0) + c * value
    return out


def substitute(combination: Mapping[str, float], name: str, expansion: Mapping[str, float]) -> dict[str, float]:
    """``combination`` with the operand ``name`` replaced by its own combination ``expansion`` of other operands."""
    rest = {k: v for k, v in combination.items() if k != name}
    return combine((1.0, rest), (combination.get(name, 0.0), expansion))


def conversion_rows(prediction_type: str, algorithm: str, alpha_t: float, sigma_t: float,
                    thresholding: bool) -> list[tuple[str, dict[str, float]]]:
    """The rows that turn the model output m at (α_t, σ_t) (VP) into what a λ-space solver steps with, the last
    row named "m0": x̂0 for the "++" algorithms ("x0"), ε̂ for the others ("eps"). x̂0: ε-prediction (x − σ_t·m)/α_t,
    x0-prediction m, v-prediction α_t·x − σ_t·m; ε̂: ε-prediction m, x0-prediction (x − α_t·m)/σ_t, v-prediction
    α_t·m + σ_t·x. With thresholding (applied to output 0) ε̂ is re-derived from the thresholded x̂0:
    ε̂ = (x − α_t·x̂0)/σ_t, one more row. ``algorithm`` "eps-via-x0" is DEIS's ε̂: always (x − α_t·x̂0)/σ_t."""
    if prediction_type == "epsilon":
        x0 = {"x": 1.0 / alpha_t, "m": -sigma_t / alpha_t}
    elif prediction_type == "sample":
        x0 = {"m": 1.0}
    else:  # v_prediction
        x0 = {"x": alpha_t, "m": -sigma_t}
    if algorithm == "x0":
        return [("m0", x0)]
    eps_from_x0 = {"x": 1.0 / sigma_t, "x0": -alpha_t / sigma_t}
    if thresholding:
        return [("x0", x0), ("m0", eps_from_x0)]
    if algorithm == "eps-via-x0":  # (x − α_t·x̂0)/σ_t with x̂0 substituted, folded in float64
        return [("m0", combine((1.0 / sigma_t, {"x": 1.0}), (-alpha_t / sigma_t, x0)))]
    if prediction_type == "epsilon":
        return [("m0", {"m": 1.0})]
    if prediction_type == "sample":
        return [("m0", {"x": 1.0 / sigma_t, "m": -alpha_t / sigma_t})]
    return [("m0", {"x": sigma_t, "m": alpha_t})]


def fix_fields(config, fixed: Mapping[str, Any]) -> None:
    """Store ``fixed`` values in fields of the common config that diffusers' class of this name does not have (so
    a config from another scheduler that sets them loads, and they are ignored, as diffusers ignores them)."""
    for name, value in fixed.items():
        object.__setattr__(config, name, value)


def drop_fixed(config_class, kwargs: dict) -> dict:
    """Constructor keywords without the config_class.FIXED fields: they then count as left at their defaults
    (``_use_default_values``), so from_config into another class gives them that class's defaults, as in
    diffusers, whose class has no such keys."""
    return {k: v for k, v in kwargs.items() if k not in config_class.FIXED}


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DPMSolverSinglestepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # fixed: diffusers' singlestep solver always spaces n + 1 points over [0, T)
    solver_order: int = 2  # 1, 2 or 3: the model calls per group (3 for unconditional, 2 for guided sampling)
    algorithm_type: str = "dpmsolver++"  # "dpmsolver++" (on x̂0), "dpmsolver" (on ε̂), "sde-dpmsolver++" (stochastic)
    solver_type: str = "midpoint"  # how the first-derivative term is weighted: "midpoint" or "heun"
    lower_order_final: bool = False  # end on a group of lower order (set to True by set_timesteps where needed)
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ over the training range
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles over the training range (needs scipy)
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at training timestep 0)
    lambda_min_clipped: Any = -math.inf  # the smallest λ sampled (a float, −inf: no cut); typed Any for the −inf

    thresholding: bool = False  # dynamic thresholding of x̂0 (Saharia et al. 2022)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    UNSUPPORTED: ClassVar[dict] = {"use_flow_sigmas": False, "variance_type": None, "use_dynamic_shifting": False}
    INERT: ClassVar[tuple] = ("flow_shift", "time_shift_type")
    # common fields diffusers' DPMSolverSinglestepScheduler does not have: held at these values, given values ignored
    FIXED: ClassVar[dict] = {"timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False}

    def __post_init__(self):
        fix_fields(self, self.FIXED)
        # what diffusers maps when it builds this class from a DEIS or UniPC config (from_config across compatibles)
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        super().__post_init__()
        check_thresholding(self)
        check_lambda_min_clipped(self)
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type='zero' needs a data-prediction solver (algorithm_type dpmsolver++ or "
                             "sde-dpmsolver++), got algorithm_type='dpmsolver'; use final_sigmas_type='sigma_min'")


# --------------------------------------------------------------------------------------------- the scheduler
class DPMSolverSinglestepScheduler(SigmaScheduler):
    """Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022a/b), ODE or SDE, orders 1–3, diffusers-compatible;
    configured by :class:`DPMSolverSinglestepConfig`.

    ``order_list`` holds the order of each step (:meth:`get_order_list`): a group of orders 1, 2, …, k makes k model
    calls from the sample stored at the group's start (``self.sample``); ``model_outputs`` holds the converted
    outputs (x̂0 or ε̂) of the last solver_order steps. Timesteps are int64, as in diffusers.
    """

    config_class = DPMSolverSinglestepConfig
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**drop_fixed(self.config_class, kwargs))
        self.timesteps = self.timesteps.to(torch.int64)
        self._timestep_list = self.timesteps.tolist()
        self._reset_history()
        self.order_list = self.get_order_list(self.settings.num_train_timesteps)

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.settings.solver_order  # x̂0 (or ε̂) of the last steps
        self.sample: Tensor | None = None  # the sample at the start of the current group

    # the parts shared with the multistep solver: x̂0/ε̂ from the model output, the λ cut, add_noise, the input
    convert_model_output = DPMSolverMultistepScheduler.convert_model_output
    _last_timestep = DPMSolverMultistepScheduler._last_timestep
    add_noise = DPMSolverMultistepScheduler.add_noise
    scale_model_input = DPMSolverMultistepScheduler.scale_model_input

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of each of n steps: groups 1, 2, …, solver_order; with lower_order_final the groups that do
        not fit end the list as a shorter group (and with n a multiple of solver_order, the last full group is split
        into two shorter ones); the last step is first order when the final σ is 0 (diffusers' rule)."""
        cfg = self.settings
        k, n = cfg.solver_order, num_inference_steps
        group = list(range(1, k + 1))
        if not cfg.lower_order_final:
            orders = group * (n // k)
        elif n % k:
            orders = group * (n // k) + group[: n % k]
        else:  # the last full group becomes two shorter ones: [1, 2] + [1] (k = 3), [1] + [1] (k = 2)
            orders = group * (n // k - 1) + group[: k - 1] + [1] if k > 1 else group * n
        if cfg.final_sigmas_type == "zero" and orders:
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """n timesteps evenly spaced over [0, T) (less the timesteps whose λ is below lambda_min_clipped), or Karras /
        exponential / beta σ's, or custom descending ``timesteps``; then the order of each step.

        As diffusers does, this sets config.lower_order_final to True when n is not a multiple of solver_order or
        the final σ is 0 (the last group must fit and end on a first-order step).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]), timesteps, or mu (dynamic
        shifting is not supported).
        """
        if mu is not None:
            raise ValueError(f"mu={mu!r} needs use_dynamic_shifting, which fastdiff does not support")
        cfg = self.settings
        T = cfg.num_train_timesteps
        if check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps) == "timesteps":
            schedule = check_custom_timesteps(timesteps, T, np.int64, cfg.use_karras_sigmas,
                                              use_exponential_sigmas=cfg.use_exponential_sigmas,
                                              use_beta_sigmas=cfg.use_beta_sigmas)
            n = len(schedule)
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            # n + 1 points over [0, last) rounded, the smallest dropped
            schedule = spaced_timesteps("linspace", self._last_timestep(), n + 1)[:-1].astype(np.int64)
        sigma_min, sigma_max = float(self._train_sigmas[0]), float(self._train_sigmas[-1])
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigmas, self._log_sigmas).round()
        elif cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            sigmas = (exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas)(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)  # truncated to int64 below, as diffusers does
        else:
            sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        self._set_schedule(schedule, sigmas, self._last_sigma(cfg.final_sigmas_type), device, torch.int64)
        if not cfg.lower_order_final and (n % cfg.solver_order or cfg.final_sigmas_type == "zero"):
            logger.info("DPMSolverSinglestepScheduler: lower_order_final set to True (n=%d steps, solver_order=%d, "
                        "final_sigmas_type=%r), as diffusers does", n, cfg.solver_order, cfg.final_sigmas_type)
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(n)
        self._reset_history()

    def _vp(self, j: int) -> tuple[float, float, float]:
        """(α, σ, λ = log α − log σ) of the VP process at schedule index j (float64); σ > 0."""
        alpha, sigma = alpha_sigma(self._sigma_list[j])
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def update_coefficients(self, order: int) -> dict[str, float]:
        """The singlestep update of ``order`` ending this step, as coefficients of "x_s" (the sample stored at the
        group's start s; "x", this step's sample, for order 1), "m0" (this step's x̂0/ε̂), "m1", "m2" (the group's
        earlier ones) and "noise" (float64).

        With h = λ_t − λ_s, s_0 this step, s_1 the one before, and r_j = (λ_{s_j} − λ_s)/h:
        order 1: D0 = m0; order 2: D0 = m1, D1 = (m0 − m1)/r0; order 3: D0 = m2, D1_1 = (m0 − m2)/r0,
        D1_0 = (m1 − m2)/r1, D1 = (r0·D1_0 − r1·D1_1)/(r0 − r1), D2 = 2·(D1_1 − D1_0)/(r0 − r1). Then x_t =
        c_x·x_s + c_0·D0 + c_1·D1 (+ c_2·D2) (+ c_z·z), with (Lu et al. 2022b eq. 5 / §4, Lu et al. 2022a Alg. 1–2)
        - dpmsolver++: c_x = σ_t/σ_s, c_0 = −α_t·(e^(−h) − 1), c_1 = ½·c_0 (midpoint) or α_t·((e^(−h) − 1)/h + 1)
          (heun), c_2 = −α_t·((e^(−h) − 1 + h)/h² − ½);
        - sde-dpmsolver++: the same at g = 2h, with c_x = e^(−h)·σ_t/σ_s, c_2 = α_t·((1 − e^(−g) − g)/g² − ½), and
          c_z = σ_t·√(1 − e^(−2h));
        - dpmsolver: c_x = α_t/α_s, c_0 = −σ_t·(e^h − 1), c_1 = ½·c_0 or −σ_t·((e^h − 1)/h − 1),
          c_2 = −σ_t·((e^h − 1 − h)/h² − ½).
        Order 3 "midpoint" takes the heun c_1 on D1_1 and no D2 (diffusers' forms). σ_t = 0 ("++" solvers, the last
        step): x_t = x̂0. A repeated σ in the group (a zero step in λ) takes the first-order step from this step's
        sample instead (diffusers divides by zero there).
        """
        cfg, i = self.settings, self._step_index
        if self._sigma_list[i + 1] == 0.0:
            return {"m0": 1.0}
        (alpha_t, sigma_t, lambda_t), (alpha_s, sigma_s, lambda_s) = self._vp(i + 1), self._vp(i - order + 1)
        h = lambda_t - lambda_s
        ratios = [(self._vp(i - j)[2] - lambda_s) / h if h else 0.0 for j in range(order - 1)]  # r0 (, r1)
        if order > 1 and (h == 0.0 or 0.0 in ratios or (order == 3 and ratios[0] == ratios[1])):
            return self.update_coefficients(1)
        if order == 1:
            D = [{"m0": 1.0}]
        elif order == 2:
            D = [{"m1": 1.0}, combine((1 / ratios[0], {"m0": 1.0}), (-1 / ratios[0], {"m1": 1.0}))]
        else:
            r0, r1 = ratios
            d1_1 = combine((1 / r0, {"m0": 1.0}), (-1 / r0, {"m2": 1.0}))
            d1_0 = combine((1 / r1, {"m1": 1.0}), (-1 / r1, {"m2": 1.0}))
            if cfg.solver_type == "midpoint":
                D = [{"m2": 1.0}, d1_1]
            else:
                D = [{"m2": 1.0}, combine((r0 / (r0 - r1), d1_0), (-r1 / (r0 - r1), d1_1)),
                     combine((2 / (r0 - r1), d1_1), (-2 / (r0 - r1), d1_0))]
        heun = cfg.solver_type == "heun" or order == 3
        if cfg.algorithm_type == "dpmsolver":
            e = math.expm1(h)  # e^h − 1
            c_x, c_z = alpha_t / alpha_s, 0.0
            c = [-sigma_t * e]
            if len(D) > 1:
                c.append(-sigma_t * (e / h - 1.0) if heun else -0.5 * sigma_t * e)
            if len(D) > 2:
                c.append(-sigma_t * ((e - h) / h**2 - 0.5))
        else:
            sde = cfg.algorithm_type == "sde-dpmsolver++"
            g = 2.0 * h if sde else h  # the SDE update's terms are the ODE's at 2h
            e = math.expm1(-g)  # e^(−g) − 1
            c_x = sigma_t / sigma_s * (math.exp(-h) if sde else 1.0)
            c_z = sigma_t * math.sqrt(-e) if sde else 0.0
            c = [-alpha_t * e]
            if len(D) > 1:
                c.append(alpha_t * (e / g + 1.0) if heun else -0.5 * alpha_t * e)
            if len(D) > 2:
                c.append(alpha_t * ((-e - g) / g**2 - 0.5) if sde else -alpha_t * ((e + g) / g**2 - 0.5))
        out = combine((c_x, {"x" if order == 1 else "x_s": 1.0}), *zip(c, D))
        if c_z:
            out["noise"] = c_z
        return out

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True, *, guidance_scale: float | None = None):
        """One singlestep DPM-Solver step: the step of order ``order_list[step_index]`` (lower while the group's
        earlier outputs are missing, e.g. after set_begin_index) from the group's stored sample to the next σ.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler`; generator for the SDE solver's fresh noise
        (drawn as diffusers draws it: sample's shape, the model output's dtype). Returns x_t only, as diffusers'
        solver does: a SchedulerOutput whose only field is prev_sample, or with return_dict=False (prev_sample,).
        Raises ValueError (model_output's shape), TypeError (non-tensors), TimestepsNotSetError.
        """
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        cfg = self.settings
        # 1. this step's order: the group's earlier outputs must be there
        order = self.order_list[i]
        while order > 1 and self.model_outputs[-(order - 1)] is None:
            order -= 1
        if order == 1:  # a group starts here: its steps all start from this sample
            self.sample = sample
        coefficients = self.update_coefficients(order)
        # 2. the operands: the group's start sample, the group's earlier outputs, the SDE's noise
        inputs: dict[str, Tensor] = {}
        if "x_s" in coefficients:
            inputs["x_s"] = self.sample
        for j in range(1, order):
            inputs[f"m{j}"] = self.model_outputs[-j]
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if cfg.algorithm_type == "sde-dpmsolver++":
            inputs["noise"] = randn_tensor(sample.shape, generator, sample.device, dtype)
        # 3. one fused op: x̂0 (or ε̂) at this σ, then x_t
        alpha, sigma, _ = self._vp(i)
        target = "x0" if cfg.algorithm_type.endswith("++") else "eps"
        rows = conversion_rows(cfg.prediction_type, target, alpha, sigma, cfg.thresholding)
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        # x_t from (x, m) (or the thresholded x̂0), not from the rounded ε̂/x̂0: the float64 coefficients then cancel
        # what fp32 arithmetic would not (a thresholded x̂0 itself is not linear in (x, m): it stays an operand)
        if not (cfg.thresholding and len(rows) == 1):
            coefficients = substitute(coefficients, "m0", rows[-1][1])
        outs = fused_linear_step(sample, model_output, inputs, [*rows, ("prev_sample", coefficients)],
                                 guidance_scale, threshold)
        self.model_outputs = self.model_outputs[1:] + [outs[-2]]
        out = self._end_step(outs[-1], None, model_output.dtype, return_dict)
        return out if return_dict else out[:1]  # (prev_sample,), as diffusers' solver returns
