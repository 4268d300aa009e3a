"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"):
a multistep solver in half-log-SNR time λ = log(α_t/σ_t) whose every step first corrects the sample it is given with
the model output just computed (UniC, Algorithm 2), then predicts the next sample (UniP, Algorithm 1); the B(h)
variants "bh1" (B(h) = h) and "bh2" (B(h) = e^h − 1), on the data prediction x̂0 or the noise prediction ε̂
(diffusers' UniPCMultistepScheduler).

The whole step is one :func:`fastdiff.ops.linear_step` call: the per-step coefficients, including the small linear
solves for the B(h) weights ρ (eq. 10 of the paper), are computed on the host in float64 from the σ table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import Generator, check_step_inputs
from fastdiff.schedulers.config import FINAL_SIGMAS_TYPES, SchedulerConfig, check_sigma_spacings, check_thresholding
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
from fastdiff.validation import check_choice, check_int, check_real

SOLVER_TYPES = ("bh1", "bh2")
# DPM-Solver / DEIS solver types, mapped to "bh2" when their configs load into UniPC (diffusers' mapping)
FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "logrho")
MAX_SOLVER_ORDER = 5  # the corrector of order p reads last_sample and p history entries: ≤ 6 linear_step inputs


@dataclass(frozen=True)
class UniPCMultistepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    solver_order: int = 2  # p of UniPC-p (UniC makes it order p + 1): 2 for guided sampling, 3 for unconditional
    predict_x0: bool = True  # step with the data prediction x̂0 (True) or the noise prediction ε̂ (False)
    solver_type: str = "bh2"  # B(h): "bh1" (h, Zhao et al. eq. 11) or "bh2" (e^h − 1, better for guidance / > 10 steps)
    lower_order_final: bool = True  # the last steps at order min(solver_order, steps left)
    disable_corrector: tuple[int, ...] = ()  # steps i whose output is not corrected (at step i + 1)
    use_karras_sigmas: bool = False  # σ spaced as in Karras et al. 2022, eq. 5 (ρ = 7)
    use_exponential_sigmas: bool = False  # σ evenly spaced in log σ
    use_beta_sigmas: bool = False  # σ spaced by Beta(0.6, 0.6) quantiles (needs scipy)
    final_sigmas_type: str = "zero"  # σ after the last step: "zero" or "sigma_min" (the smallest σ of the schedule)
    sigma_min: float | None = None  # the ends of the Karras / exponential / beta spacings (None: the training range)
    sigma_max: float | None = None

    thresholding: bool = False  # dynamic thresholding of x̂0 (Saharia et al. 2022; with predict_x0 only)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    # solver_p (another scheduler as the predictor, "solver_p + UniC") would put a second scheduler's step inside
    # this one, which the single fused update cannot hold; the flow-matching options are not implemented
    UNSUPPORTED: ClassVar[dict] = {"solver_p": None, "use_flow_sigmas": False, "use_dynamic_shifting": False,
                                   "shift_terminal": None}
    INERT: ClassVar[tuple] = ("flow_shift", "time_shift_type")

    def __post_init__(self):
        if self.solver_type in FOREIGN_SOLVER_TYPES:  # a DPM-Solver / DEIS config loaded into UniPC, as diffusers does
            object.__setattr__(self, "solver_type", "bh2")
        check_sigma_spacings(self, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        super().__post_init__()
        check_thresholding(self)
        check_int("solver_order", self.solver_order, minimum=1, maximum=MAX_SOLVER_ORDER)
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        for name in ("sigma_min", "sigma_max"):
            check_real(name, getattr(self, name), positive=True, allow_none=True)


def lambda_of(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ = log α_t − log σ_t) of the VP process at the VE noise level σ = σ_t/α_t > 0 (float64)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    return alpha_t, sigma_t, math.log(alpha_t) - math.log(sigma_t)


def bh_system(hh: float, rks: list[float], solver_type: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The B(h) order conditions of UniPC (Zhao et al. 2023, eq. 10 / Algorithm 1–2) at the signed step
    hh = −h (x̂0) or h (ε̂), h = λ_t − λ_s0 > 0, with the ratios r_k = (λ_sk − λ_s0)/h of the p points (the last
    r = 1): (φ1 = e^hh − 1, B(hh), R, b), R[i][k] = r_k^i (p × p) and b_i = i!·φ_{i+1}(hh)·hh/B(hh) for i = 1..p, where
    hφ_{k+1} is built by the recursion φ ← φ/hh − 1/k!. Float64."""
    p = len(rks)
    phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else phi_1
    h_phi_k = phi_1 / hh - 1.0
    factorial = 1
    b = []
    for i in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.array([[r ** (i - 1) for r in rks] for i in range(1, p + 1)], dtype=np.float64)
    return phi_1, b_h, R, np.array(b, dtype=np.float64)


def expand(row: dict[str, float], defined: dict[str, dict[str, float]]) -> dict[str, float]:
    """``row`` (operand name → coefficient) with each operand named in ``defined`` replaced by its own row."""
    out: dict[str, float] = {}
    for name, c in row.items():
        for sub, w in (defined[name].items() if name in defined else [(name, 1.0)]):
            out[sub] = out.get(sub, 0.0) + c * w
    return out


class UniPCMultistepScheduler(SigmaScheduler):
    """UniPC multistep sampler (Zhao et al. 2023; UniC corrector + UniP predictor, B(h) = h or e^h − 1, orders
    1–5), diffusers-compatible; configured by :class:`UniPCMultistepConfig`.

    State between steps (diffusers' names): ``model_outputs`` (the converted model outputs x̂0 or ε̂ of the last
    solver_order steps, fp32), ``last_sample`` (the corrected sample the last predictor started from),
    ``this_order`` (the last predictor's order), ``lower_order_nums`` (steps taken, capped at solver_order).
    """

    config_class = UniPCMultistepConfig
    init_noise_sigma = 1.0

    # x_t is fed to the model unscaled, and noised as α_t·x0 + σ_t·ε: as in DPM-Solver (one home for both)
    scale_model_input = DPMSolverMultistepScheduler.scale_model_input
    add_noise = DPMSolverMultistepScheduler.add_noise

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.timesteps = self.timesteps.to(torch.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.settings.solver_order
        self.lower_order_nums = 0
        self.last_sample: Tensor | None = None
        self.this_order = 1

    @property
    def solver_p(self) -> None:
        """Always None: fastdiff's UniPC is UniP + UniC (a ``solver_p`` predictor is refused at construction)."""
        return None

    @property
    def disable_corrector(self) -> list[int]:
        return list(self.settings.disable_corrector)

    # ----------------------------------------------------------------- the schedule
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None) -> None:
        """Choose n timesteps by config.timestep_spacing (or Karras / exponential / beta σ) and their σ's (int64
        timesteps, fp32 σ's with the final σ appended).

        ``sigmas`` (custom σ's) are accepted by diffusers only with flow-matching σ's, which fastdiff does not
        implement: ValueError. ``mu`` is only read with dynamic shifting (not implemented) and is ignored.
        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or steps_offset.
        """
        cfg = self.settings
        if sigmas is not None:
            raise ValueError("sigmas: custom σ's need use_flow_sigmas=True in diffusers' UniPC, which fastdiff's "
                             "UniPCMultistepScheduler does not support; pass num_inference_steps")
        T = cfg.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        if cfg.timestep_spacing == "trailing":
            schedule = spaced_timesteps("trailing", T, n)
        else:  # n + 1 points over [0, T), the smallest dropped
            schedule = spaced_timesteps(cfg.timestep_spacing, T, n + 1, cfg.steps_offset)[:-1]
        schedule = check_steps_offset(schedule.astype(np.int64), T, cfg.steps_offset)
        sigma_min = cfg.sigma_min if cfg.sigma_min is not None else float(self._train_sigmas[0])
        sigma_max = cfg.sigma_max if cfg.sigma_max is not None else float(self._train_sigmas[-1])
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            spacing = (karras_sigmas if cfg.use_karras_sigmas else
                       exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas)
            sigmas = spacing(sigma_min, sigma_max, n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)
            if cfg.use_karras_sigmas:  # Karras timesteps are rounded, the others truncated (as diffusers does)
                schedule = schedule.round()
            # "sigma_min": the last σ of the spacing itself
            sigma_last = 0.0 if cfg.final_sigmas_type == "zero" else float(sigmas[-1])
        else:
            sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
            sigma_last = self._last_sigma(cfg.final_sigmas_type)
        self._set_schedule(schedule, sigmas, sigma_last, device, torch.int64)
        self._reset_history()

    # ----------------------------------------------------------------- the step's coefficients (host, float64)
    def _conversion_row(self, i: int) -> dict[str, float]:
        """What the solver steps with, as a combination of x and the model output m at σ_i: x̂0 (predict_x0; Lu et
        al. 2022b, §3.1) or ε̂, from any model parameterisation (VP: x = α·x0 + σ·ε, v = α·ε − σ·x0)."""
        cfg = self.settings
        alpha_t, sigma_t = alpha_sigma(self._sigma_list[i])
        prediction = cfg.prediction_type
        if cfg.predict_x0:
            if prediction == "epsilon":
                return {"x": 1.0 / alpha_t, "m": -sigma_t / alpha_t}
            if prediction == "sample":
                return {"m": 1.0}
            return {"x": alpha_t, "m": -sigma_t}  # v_prediction
        if prediction == "epsilon":
            return {"m": 1.0}
        if prediction == "sample":
            return {"x": 1.0 / sigma_t, "m": -alpha_t / sigma_t}
        return {"x": sigma_t, "m": alpha_t}  # v_prediction

    def _uni_row(self, t: int, s0: int, order: int, base: str, newest: str, older: list[str],
                 corrector: bool) -> dict[str, float]:
        """One B(h) update from σ_s0 (schedule index ``s0``) to σ_t (index ``t``) as a combination of named operands:
        x_t = c·``base`` − scale·φ1·D0 − scale·B(h)·Σ_k ρ_k·(D_k − D0)/r_k (Zhao et al. 2023, Algorithms 1–2), with
        scale = α_t (x̂0) or σ_t (ε̂) and c = σ_t/σ_s0 or α_t/α_s0. The predictor (UniP) reads D0 = ``newest`` (the
        output at σ_s0) and the ``older`` outputs D_k at σ_{s0−k}, k < order, with ρ from the (order − 1)-point
        system (ρ = ½ at order 2); the corrector (UniC) reads D0 = ``older[0]`` (at σ_s0), D_k = ``older[k]`` and
        the new output ``newest`` at σ_t (r = 1), with ρ from the order-point system (ρ = ½ at order 1).

        Limits where diffusers' formulas are 0·∞ (diffusers returns NaN/inf there, or fails to solve): σ_t = 0 gives
        x̂0 at σ_s0 whatever the order; h = 0 (a repeated σ) the identity; a repeated σ among the older points the
        first-order update."""
        cfg = self.settings
        sigma_next = self._sigma_list[t]
        alpha_s0, sigma_s0, lambda_s0 = lambda_of(self._sigma_list[s0])
        d0 = older[0] if corrector else newest
        if sigma_next == 0.0:  # h = ∞: the update's limit is the data prediction at σ_s0
            if cfg.predict_x0:
                return {d0: 1.0}
            return {base: 1.0 / alpha_s0, d0: -sigma_s0 / alpha_s0}
        alpha_t, sigma_t, lambda_t = lambda_of(sigma_next)
        h = lambda_t - lambda_s0
        if h == 0.0:
            return {base: 1.0}
        n_old = order - 1  # points before σ_s0 used
        rks = [(lambda_of(self._sigma_list[s0 - k])[2] - lambda_s0) / h for k in range(1, n_old + 1)]
        if any(r == 0.0 for r in rks):
            return self._uni_row(t, s0, 1, base, newest, older, corrector)
        hh = -h if cfg.predict_x0 else h
        phi_1, b_h, R, b = bh_system(hh, rks + [1.0], cfg.solver_type)
        if corrector:
            rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        else:
            rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        scale = alpha_t if cfg.predict_x0 else sigma_t
        row = {base: sigma_t / sigma_s0 if cfg.predict_x0 else alpha_t / alpha_s0, d0: -scale * phi_1}
        # the divided differences (D_k − D0)/r_k, and for the corrector the new point's D_t − D0 (r = 1)
        points = [(older[k] if corrector else older[k - 1], r) for k, r in enumerate(rks, start=1)]
        if corrector:
            points.append((newest, 1.0))
        for (name, r), rho in zip(points, rhos):
            w = -scale * b_h * rho / r
            row[name] = row.get(name, 0.0) + w
            row[d0] = row[d0] - w
        return row

    def _predictor_order(self, i: int) -> int:
        """The order of step i's predictor (diffusers' rule): solver_order, at most the steps left when
        lower_order_final, at most one more than the steps taken so far (the warm-up)."""
        cfg = self.settings
        order = min(cfg.solver_order, len(self._timestep_list) - i) if cfg.lower_order_final else cfg.solver_order
        return min(order, self.lower_order_nums + 1)

    # ----------------------------------------------------------------- step
    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             generator: Generator = None, guidance_scale: float | None = None):
        """One UniPC step from σ_i (this timestep) to σ_{i+1}: correct x_i with the new model output (UniC), then
        predict x_{i+1} from the corrected sample (UniP), in one fused :func:`fastdiff.ops.linear_step`:
        output 0 = the converted model output (x̂0 or ε̂, thresholded if configured), output 1 = the corrected
        sample (kept as ``last_sample``), output 2 = x_{i+1}; without the corrector (the first step, or step i − 1
        in config.disable_corrector) output 1 is x_{i+1} and ``last_sample`` is x_i as given.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (``generator`` is accepted for pipelines
        that pass one to every scheduler, and unused: UniPC draws no noise). Returns, as diffusers' UniPC does, a
        SchedulerOutput whose only field is prev_sample, or with return_dict=False (prev_sample,). Raises
        ValueError for a model_output of the wrong shape, TimestepsNotSetError before set_timesteps.
        """
        check_step_inputs(model_output, sample, guidance_scale)
        guidance_scale = check_real("guidance_scale", guidance_scale, allow_none=True)
        i = self._current_step(timestep)
        cfg = self.settings
        out_dtype = model_output.dtype
        if model_output.dtype != sample.dtype:  # the fused op takes one dtype: widen both
            model_output, sample = model_output.float(), sample.float()
        # 1. the plan: named operands x, m, the inputs (last_sample, history), then the outputs c, x_c, x_next
        use_corrector = i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None
        order = self._predictor_order(i)
        history = [f"h{k}" for k in range(cfg.solver_order)]  # h0 = model_outputs[-1], the newest
        rows = [self._conversion_row(i)]
        if use_corrector:
            rows.append(self._uni_row(i, i - 1, self.this_order, "last", "c", history, corrector=True))
        base = "xc" if use_corrector else "x"
        rows.append(self._uni_row(i + 1, i, order, base, "c", history, corrector=False))
        # the converted output c written out as its combination of x and m in the later rows, the coefficients of x
        # and m combined in float64: where σ is large, c_x·x and the x̂0/ε̂ terms nearly cancel, and fp32 would lose
        # digits forming them one by one (a thresholded x̂0 is not linear in x and m: it stays an operand). The
        # corrected sample stays an operand: written out, its terms and the predictor's cancel far worse.
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding and cfg.predict_x0 \
            else None
        if threshold is None:
            rows[1:] = [expand(row, {"c": rows[0]}) for row in rows[1:]]
        # 2. only the operands some row reads go in
        stored = {name: self.model_outputs[-1 - k] for k, name in enumerate(history)}
        stored["last"] = self.last_sample
        used = [name for name in ("last", *history) if any(name in row for row in rows)]
        names = ["x", "m", *used, "c", "xc"]
        coefficients = [[row.get(name, 0.0) for name in names[:2 + len(used) + j]] for j, row in enumerate(rows)]
        outs = ops.linear_step(sample, model_output, [stored[name].to(sample.device) for name in used],
                               coefficients=coefficients, guidance_scale=guidance_scale, threshold=threshold)
        # 3. the state: the history shifted, the corrected sample kept
        self.model_outputs = self.model_outputs[1:] + [outs[0]]
        self.last_sample = outs[1] if use_corrector else sample
        self.this_order = order
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        out = self._end_step(outs[-1], None, out_dtype, return_dict)
        return out if return_dict else out[:1]  # (prev_sample,), as diffusers' UniPC returns

    def convert_model_output(self, model_output: Tensor, *args, sample: Tensor | None = None, **kwargs) -> Tensor:
        """x̂0 (predict_x0) or ε̂ at the current step's σ from the model output (thresholded where configured), as
        diffusers' method of this name; ``sample`` as keyword or second positional argument. fp32."""
        if sample is None:
            if len(args) < 2:
                raise ValueError("convert_model_output needs sample (keyword or second positional argument)")
            sample = args[1]
        check_step_inputs(model_output, sample, None)
        self._require_timesteps()
        if self._step_index is None:
            raise ValueError("convert_model_output reads the current step's σ: call it during sampling (once step() "
                             "has set the step index)")
        cfg = self.settings
        row = self._conversion_row(self._step_index)
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding and cfg.predict_x0 \
            else None
        return ops.linear_step(sample, model_output.to(sample.dtype), [], threshold=threshold,
                               coefficients=[[row.get("x", 0.0), row.get("m", 0.0)]])[0]
