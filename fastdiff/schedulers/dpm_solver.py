"""Multistep DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), ODE and SDE variants, orders 1–3, in
half-log-SNR time λ = log(α_t/σ_t): the "++" solvers step with the data prediction x̂0, the others with the noise
prediction ε̂; the SDE variants add fresh noise every step (diffusers' DPMSolverMultistepScheduler, "DPM++ 2M SDE")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops, reference
from fastdiff.schedulers.base import Generator, check_step_inputs, randn_tensor
from fastdiff.schedulers.config import (
    FINAL_SIGMAS_TYPES,
    SchedulerConfig,
    check_lambda_min_clipped,
    check_sigma_spacings,
    check_thresholding,
)
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
)
from fastdiff.schedulers.sigma import SigmaScheduler
from fastdiff.validation import check_choice

SOLVER_TYPES = ("midpoint", "heun")
ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


@dataclass(frozen=True)
class DPMSolverMultistepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    solver_order: int = 2  # 1 (= DDIM for dpmsolver++), 2 (2M) or 3 (3M)
    algorithm_type: str = "dpmsolver++"  # one of ALGORITHM_TYPES: "++" on x̂0, else on ε̂; "sde-": stochastic
    solver_type: str = "midpoint"  # how the second-order term is weighted: "midpoint" or "heun"
    lower_order_final: bool = True  # first order for the last step when there are fewer than 15 steps
    euler_at_final: bool = False  # first order for the last step always
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (σ at training timestep 0)

    thresholding: bool = False  # dynamic thresholding of x̂0 (Saharia et al. 2022)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ over the training range
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles over the training range (needs scipy)
    use_lu_lambdas: bool = False  # λ evenly spaced (Lu et al. 2022a), timesteps rounded
    lambda_min_clipped: Any = -math.inf  # the smallest λ = log(α/σ) sampled (a float, −inf: no cut); timesteps
    # whose λ is below it are not sampled (typed Any so that −inf passes the config's finite-number check)

    UNSUPPORTED: ClassVar[dict] = {"use_flow_sigmas": False, "variance_type": None, "use_dynamic_shifting": False}
    INERT: ClassVar[tuple] = ("flow_shift", "time_shift_type")

    def __post_init__(self):
        # what diffusers maps when it builds DPM-Solver from a DEIS or UniPC config (from_config across compatibles)
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"))
        super().__post_init__()
        check_thresholding(self)
        check_lambda_min_clipped(self)
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError("solver_order=3 has no update for algorithm_type='sde-dpmsolver' (diffusers has none "
                             "either: its third step fails); use solver_order 1 or 2, or 'sde-dpmsolver++'")
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs a data-prediction solver (algorithm_type dpmsolver++ or "
                             f"sde-dpmsolver++), got algorithm_type={self.algorithm_type!r}; use "
                             f"final_sigmas_type='sigma_min'")
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of the variance-preserving process at the variance-exploding noise level σ = σ_t/α_t."""
    alpha_t = 1 / math.sqrt(sigma**2 + 1)
    return alpha_t, sigma * alpha_t


class DPMSolverMultistepScheduler(SigmaScheduler):
    """Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022a/b; "2M", "3M", ODE or SDE), diffusers-compatible, orders
    1–3; configured by :class:`DPMSolverMultistepConfig`."""

    config_class = DPMSolverMultistepConfig
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.timesteps = self.timesteps.to(torch.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.settings.solver_order  # x̂0 of the last steps
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose n timesteps (config.timestep_spacing, or Karras σ), or take custom descending ``timesteps``.

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or timesteps.
        """
        cfg = self.settings
        T = cfg.num_train_timesteps
        if check_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps) == "timesteps":
            schedule = check_custom_timesteps(timesteps, T, np.int64, cfg.use_karras_sigmas,
                                              use_exponential_sigmas=cfg.use_exponential_sigmas,
                                              use_beta_sigmas=cfg.use_beta_sigmas, use_lu_lambdas=cfg.use_lu_lambdas)
            n = len(schedule)
        else:
            n = check_num_inference_steps(num_inference_steps, T)
            last = self._last_timestep()  # T, or fewer where lambda_min_clipped cuts the small λ's
            if cfg.timestep_spacing == "trailing":
                schedule = np.round(np.arange(last, 0, -T / n)) - 1
            else:  # n + 1 points over [0, last), the smallest dropped
                schedule = spaced_timesteps(cfg.timestep_spacing, last, n + 1, cfg.steps_offset)[:-1]
            schedule = check_steps_offset(schedule.astype(np.int64), T, cfg.steps_offset)
        # σ spacings over the whole training range (σ_min = σ at t = 0, σ_max at t = T − 1), as diffusers spaces them
        sigma_min, sigma_max = float(self._train_sigmas[0]), float(self._train_sigmas[-1])
        if cfg.use_karras_sigmas or cfg.use_lu_lambdas:
            # Lu et al.'s λ spacing is diffusers' log-linear σ from σ_max to σ_min; both get rounded timesteps
            sigmas = (karras_sigmas(sigma_min, sigma_max, n) if cfg.use_karras_sigmas  # log σ of the fp32 table:
                      else np.exp(np.linspace(float(self._log_sigmas[-1]), float(self._log_sigmas[0]), n)))
            schedule = sigma_to_t(sigmas, self._log_sigmas)
            if cfg.beta_schedule != "squaredcos_cap_v2":  # on the cosine schedule diffusers truncates instead
                schedule = schedule.round()
        elif cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            spacing = exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas
            sigmas = spacing(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)  # truncated to int64 below, as diffusers does
        else:
            sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        self._set_schedule(schedule, sigmas, self._last_sigma(cfg.final_sigmas_type), device, torch.int64)
        self._reset_history()

    def _last_timestep(self) -> int:
        """T minus the number of training timesteps whose λ = log α_t − log σ_t (fp32, as diffusers forms it) is below
        config.lambda_min_clipped: the timesteps are spaced over [0, this)."""
        T = self.settings.num_train_timesteps
        if self.settings.lambda_min_clipped == -math.inf:
            return T
        alphas_cumprod = self.alphas_cumprod
        lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
        clipped = int(torch.searchsorted(torch.flip(lambda_t, [0]), self.settings.lambda_min_clipped))
        return T - clipped

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        """DPM-Solver feeds x_t to the model unscaled."""
        return sample

    def convert_model_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """What the solver steps with, from any model parameterisation at the current σ: the data prediction x̂0
        for the "++" solvers (Lu et al. 2022b, §3.1), the noise prediction ε̂ for the others (with thresholding, ε̂
        re-derived from the thresholded x̂0, as diffusers does)."""
        cfg = self.settings
        alpha_t, sigma_t = alpha_sigma(self._sigma_list[self._step_index])
        if cfg.algorithm_type.endswith("++"):
            if cfg.prediction_type == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif cfg.prediction_type == "sample":
                x0_pred = model_output
            else:  # v_prediction
                x0_pred = alpha_t * sample - sigma_t * model_output
            if cfg.thresholding:
                x0_pred = reference.dynamic_threshold(x0_pred, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0_pred
        if cfg.prediction_type == "epsilon":
            epsilon = model_output
        elif cfg.prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            epsilon = alpha_t * model_output + sigma_t * sample
        if cfg.thresholding:
            x0_pred = (sample - sigma_t * epsilon) / alpha_t
            x0_pred = reference.dynamic_threshold(x0_pred, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    def _lambdas(self, *indices: int) -> list[tuple[float, float, float]]:
        """(α, σ, λ = log α − log σ) of the VP process at these schedule indices (fp64)."""
        out = []
        for j in indices:
            alpha, sigma = alpha_sigma(self._sigma_list[j])
            out.append((alpha, sigma, math.log(alpha) - math.log(sigma)))
        return out

    def first_order_update(self, x0_pred: Tensor, sample: Tensor, noise: Tensor | None = None) -> Tensor:
        """One first-order step from σ_s (this index) to σ_t (the next): for dpmsolver++,
        x_t = (σ_t/σ_s)·x_s − α_t·(e^(−h) − 1)·x̂0, h = λ_t − λ_s (Lu et al. 2022b, eq. 5; = DDIM); the other
        algorithm types as :meth:`multistep_update` of order 1 (``x0_pred`` is then ε̂, what
        :meth:`convert_model_output` gave)."""
        return self.multistep_update([x0_pred], sample, noise, order=1)

    def second_order_update(self, x0_preds: list[Tensor], sample: Tensor, noise: Tensor | None = None) -> Tensor:
        """The 2M step (:meth:`multistep_update` of order 2) from the history (x̂0's, or ε̂'s)."""
        return self.multistep_update(x0_preds, sample, noise, order=2)

    def multistep_update(self, model_outputs: list[Tensor], sample: Tensor, noise: Tensor | None,
                         order: int) -> Tensor:
        """x_t = c_x·x_s + Σ_k w_k·m_k (+ c_z·z for the SDE solvers): the multistep DPM-Solver update of ``order``
        from the newest history entries m0, m1, m2 (x̂0 or ε̂), with the weights of :meth:`update_weights`, in torch
        (step() runs the same weights in one fused ``ops.linear_step``)."""
        c_x, weights, c_z = self.update_weights(order)
        x_t = c_x * sample if c_x != 0.0 else None
        for w, m in zip(weights, reversed(model_outputs)):
            if w != 0.0:
                x_t = w * m if x_t is None else x_t + w * m
        if c_z:
            x_t = x_t + c_z * noise
        return x_t.to(torch.float32, copy=True)

    def update_weights(self, order: int) -> tuple[float, list[float], float]:
        """(c_x, [w_0, …, w_{order−1}], c_z): the step from σ_s (this index) to σ_t (the next) as
        x_t = c_x·x_s + Σ_k w_k·m_k + c_z·z over the newest history entries m0, m1, m2 (Lu et al. 2022a/b), computed
        on the host in float64.

        The solver's own form is x_t = c_x·x_s + c_0·D0 + c_1·D1 + c_2·D2 with h = λ_t − λ_s0, r0 = h_0/h,
        r1 = h_1/h, D0 = m0, and D1 = (m0 − m1)/r0 (order 2) or D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1),
        D2 = (D1_0 − D1_1)/(r0 + r1) with D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1 (order 3); the c's per algorithm
        type and solver_type are diffusers' (e^x − 1 as expm1). The D's are linear in the m's, so each weight w_k
        collects the c's times the D's coefficients of m_k.
        """
        cfg, i = self.settings, self._step_index
        algorithm = cfg.algorithm_type
        if self._sigma_list[i + 1] == 0.0:  # σ_t = 0 ("++" solvers only): h = ∞, and the update is x̂0 itself
            return 0.0, [1.0], 0.0
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0) = self._lambdas(i + 1, i)
        h = lambda_t - lambda_s0
        D = [[1.0]]  # each D as its weights on [m0, m1, m2]
        if order >= 2:
            lambdas = [lam for _, _, lam in self._lambdas(*range(i - 1, i - order, -1))]  # λ_s1 (, λ_s2)
            h_0 = lambda_s0 - lambdas[0]
            if h == 0.0 or h_0 == 0.0 or (order == 3 and lambdas[0] == lambdas[1]):
                # a repeated σ (n close to T): the differences are undefined, take the first-order step
                return self.update_weights(1)
            r0 = h_0 / h
            d1_0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m0 − m1)/r0
            if order == 2:
                D.append(d1_0)
            else:
                r1 = (lambdas[0] - lambdas[1]) / h
                d1_1 = [0.0, 1.0 / r1, -1.0 / r1]  # (m1 − m2)/r1
                diff = [u - v for u, v in zip(d1_0, d1_1)]
                D.append([u + r0 / (r0 + r1) * d for u, d in zip(d1_0, diff)])
                D.append([d / (r0 + r1) for d in diff])
        heun = cfg.solver_type == "heun" or order == 3  # order 3 has one form (the "heun" weights of D1)
        if algorithm in ("dpmsolver++", "sde-dpmsolver++"):  # on x̂0
            sde = algorithm == "sde-dpmsolver++"
            g = 2.0 * h if sde else h  # the SDE solver's terms are the ODE's at 2h
            e = math.expm1(-g)  # e^(−g) − 1
            c_x = sigma_t / sigma_s0 * (math.exp(-h) if sde else 1.0)
            c_z = sigma_t * math.sqrt(-e) if sde else 0.0
            coeffs = [-alpha_t * e]
            if len(D) > 1:
                coeffs.append(alpha_t * (e / g + 1.0) if heun else -0.5 * alpha_t * e)
            if len(D) > 2:  # (diffusers' SDE form subtracts ½ where the ODE form adds it; kept as diffusers has it)
                coeffs.append(alpha_t * ((-e - g) / g**2 - 0.5) if sde else -alpha_t * ((e + g) / g**2 - 0.5))
        else:  # on ε̂
            sde = algorithm == "sde-dpmsolver"
            e = math.expm1(h)  # e^h − 1
            c_x = alpha_t / alpha_s0
            c_z = sigma_t * math.sqrt(math.expm1(2.0 * h)) if sde else 0.0
            w = 2.0 if sde else 1.0  # the SDE solver doubles the ε̂ terms
            coeffs = [-w * sigma_t * e]
            if len(D) > 1:
                coeffs.append(-w * sigma_t * (e / h - 1.0) if heun else -0.5 * w * sigma_t * e)
            if len(D) > 2:
                coeffs.append(-sigma_t * ((e - h) / h**2 - 0.5))
        weights = [sum(c * d[k] for c, d in zip(coeffs, D) if k < len(d)) for k in range(order)]
        return c_x, weights, c_z

    def convert_weights(self) -> tuple[float, float]:
        """(a, b): what :meth:`convert_model_output` gives without thresholding, a·x + b·m at the current σ."""
        cfg = self.settings
        alpha_t, sigma_t = alpha_sigma(self._sigma_list[self._step_index])
        if cfg.algorithm_type.endswith("++"):  # x̂0
            return {"epsilon": (1.0 / alpha_t, -sigma_t / alpha_t), "sample": (0.0, 1.0),
                    "v_prediction": (alpha_t, -sigma_t)}[cfg.prediction_type]
        return {"epsilon": (0.0, 1.0), "sample": (1.0 / sigma_t, -alpha_t / sigma_t),  # ε̂
                "v_prediction": (sigma_t, alpha_t)}[cfg.prediction_type]

    def step_order(self, i: int) -> int:
        """The order step ``i`` may use (diffusers' rule): at most solver_order and the history taken so far
        (lower_order_nums), first order for the last step (euler_at_final, final_sigmas_type="zero", or
        lower_order_final under 15 steps) and at most second order for the one before it (lower_order_final under 15
        steps)."""
        n, cfg = len(self._timestep_list), self.settings
        first_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                             or cfg.final_sigmas_type == "zero")
        second_order_next_to_last = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or first_order_final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or second_order_next_to_last:
            return 2
        return 3

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: bool = True, *, guidance_scale: float | None = None):
        """One multistep DPM-Solver step from σ_s (this timestep) to σ_t (the next one).

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler`; generator (or variance_noise, the noise
        itself) for the SDE solvers' fresh noise (the ODE solvers draw none). Returns x_t only, as diffusers'
        DPM-Solver does: a SchedulerOutput whose only field is prev_sample, or with return_dict=False (prev_sample,).
        """
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        cfg = self.settings
        dtype = model_output.dtype
        if model_output.dtype != sample.dtype:
            model_output, sample = model_output.float(), sample.float()
        # 1. the SDE solvers' fresh noise (fp32, drawn as diffusers draws it)
        inputs = []
        if cfg.algorithm_type.startswith("sde-"):
            noise = (variance_noise.to(device=sample.device, dtype=torch.float32) if variance_noise is not None
                     else randn_tensor(sample.shape, generator, sample.device, torch.float32))
            inputs.append(noise)
        # 2. one fused call: the converted output m0 (x̂0, or ε̂), then x_t = c_x·x + Σ w_k·m_k + c_z·z over m0 and
        #    the history m1, m2 (inputs)
        order = self.step_order(i)
        c_x, weights, c_z = self.update_weights(order)
        weights = weights + [0.0] * (order - len(weights))  # a first-order fallback leaves the history unweighted
        history = [m for m in self.model_outputs[::-1][:order - 1]]  # m1, m2 (newest first)
        a_x, a_m = self.convert_weights()
        zeros = [0.0] * (len(inputs) + len(history))
        noise_weight = [c_z] if inputs else []
        if cfg.thresholding and not cfg.algorithm_type.endswith("++"):
            # ε̂ re-derived from the thresholded x̂0: x̂0 first (thresholded), then ε̂ = (x − α·x̂0)/σ
            alpha_t, sigma_t = alpha_sigma(self._sigma_list[i])
            x0_a, x0_b = {"epsilon": (1.0 / alpha_t, -sigma_t / alpha_t), "sample": (0.0, 1.0),
                          "v_prediction": (alpha_t, -sigma_t)}[cfg.prediction_type]
            rows = [[x0_a, x0_b, *zeros], [1.0 / sigma_t, 0.0, *zeros, -alpha_t / sigma_t],
                    [c_x, 0.0, *noise_weight, *weights[1:], 0.0, weights[0]]]
        else:
            rows = [[a_x, a_m, *zeros], [c_x, 0.0, *noise_weight, *weights[1:], weights[0]]]
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        outs = ops.linear_step(sample, model_output, [*inputs, *history], coefficients=rows,
                               guidance_scale=guidance_scale, threshold=threshold)
        converted, prev_sample = outs[-2], outs[-1]
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        out = self._end_step(prev_sample, None, dtype, return_dict)
        return out if return_dict else out[:1]  # (prev_sample,), as diffusers' DPM-Solver returns

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x_t = α_t·x0 + σ_t·ε at the σ of each timestep's place in the schedule; timesteps () or (B,)."""
        sigma = self._add_noise_sigma(original_samples, noise, timesteps)
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        sigma_t = sigma * alpha_t
        return alpha_t * original_samples + sigma_t * noise
