"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022), diffusers' PNDMScheduler and Stable
Diffusion 1.x's default sampler: three Runge–Kutta steps (PRK, four model calls each) to start, then the linear
multistep PLMS (Adams–Bashforth on ε̂), every step through the transfer x_t → x_{t−δ} of eq. 11.

Without the PRK steps (skip_prk_steps=True, Stable Diffusion's setting) the multistep phase starts itself: one Euler
step, then one step repeated at the same timestep to average two ε̂'s (a second-order start, diffusers' rule), then
orders 2, 3 and 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.base import Scheduler, as_float, check_step_inputs, step_output
from fastdiff.schedulers.config import SchedulerConfig
from fastdiff.schedulers.lms import refuse_zero_snr, without_zero_snr
from fastdiff.schedulers.schedules import check_num_inference_steps, check_steps_offset, spaced_timesteps
from fastdiff.schedulers.vp import add_noise_vp
from fastdiff.validation import check_choice

# PLMS weights of ε̂_t, ε̂_{t+δ}, … by the number of ε̂'s held (Adams–Bashforth orders 1–4; Liu et al. 2022, eq. 12)
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
# PRK: the weight of each of the four model outputs of a Runge–Kutta step in the ε̂ it steps with (RK4: 1/6, 1/3, …)
PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


@dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    skip_prk_steps: bool = False  # start with the multistep phase (Stable Diffusion) instead of 3 PRK steps
    set_alpha_to_one: bool = False  # ᾱ after the last step: 1 (a clean sample) or ᾱ_0

    def __post_init__(self):
        super().__post_init__()
        # diffusers accepts "sample" at construction and raises at the first step: refused here before any work
        check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        refuse_zero_snr(self, "PNDMScheduler")


class PNDMScheduler(Scheduler):
    """Pseudo linear multistep sampler (Liu et al. 2022, PRK + PLMS), diffusers-compatible; configured by
    :class:`PNDMConfig`. Timesteps are int64; with the PRK steps on, the first 12 entries step through half-way
    timesteps (some repeated), as diffusers lists them, and set_timesteps needs n ≥ 4.

    State, as diffusers names it: ``counter`` (steps taken since set_timesteps), ``ets`` (the last ε̂'s, raw model
    outputs, oldest first), ``cur_sample`` (the sample a multi-call step started from), ``cur_model_output`` (the
    running RK sum). Like diffusers' PNDM it has no step index: ``counter`` alone says which phase a step is in.
    """

    config_class = PNDMConfig
    init_noise_sigma = 1.0
    pndm_order = 4  # the PRK steps start the 4th-order multistep method

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._alphas_cumprod_list = self.alphas_cumprod.tolist()
        # ᾱ "before" timestep 0, used by the last step
        self.final_alpha_cumprod = 1.0 if self.settings.set_alpha_to_one else self._alphas_cumprod_list[0]
        self._timesteps = np.arange(0, self.settings.num_train_timesteps)[::-1].copy()
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self.timesteps: Tensor | None = None  # none until set_timesteps, as in diffusers
        self._reset_state()

    @classmethod
    def from_config(cls, config, **kwargs):
        """As :meth:`Scheduler.from_config`, ignoring rescale_betas_zero_snr as diffusers' PNDM does."""
        mapping, kwargs = without_zero_snr(config, kwargs)
        return super().from_config(mapping, **kwargs)

    def _reset_state(self) -> None:
        self.counter = 0
        self.ets: list[Tensor] = []
        self.cur_sample: Tensor | None = None
        self.cur_model_output: Tensor | float = 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose n timesteps (config.timestep_spacing) and lay out the phases: with PRK, the last 4 of them become
        12 PRK timesteps (each step of the 3 RK steps at t, t − δ/2, t − δ/2, t − δ, δ = ⌊T/n⌋), then the PLMS
        timesteps; with skip_prk_steps, the PLMS timesteps with the second one repeated.

        Raises ValueError naming num_inference_steps (not an integer in [1, T], or below 4 with the PRK steps on) or
        steps_offset (a timestep ≥ T).
        """
        cfg = self.settings
        T = cfg.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        if not cfg.skip_prk_steps and n < self.pndm_order:
            raise ValueError(f"num_inference_steps must be >= {self.pndm_order} with the PRK steps "
                             f"(skip_prk_steps=False), got {n}")
        ascending = spaced_timesteps(cfg.timestep_spacing, T, n, cfg.steps_offset)[::-1]
        ascending = check_steps_offset(ascending, T, cfg.steps_offset).astype(np.int64)
        self._timesteps = ascending
        if cfg.skip_prk_steps:
            # t_n, …, t_2, then t_2 again (the averaging step), then t_1 (ascending: all but the last, the
            # next-to-last again, the last; reversed)
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half = T // n // 2
            # each of the last 4 timesteps t and t + δ/2, the very last half-step dropped, then every entry doubled
            # but the first and last: t, t − δ/2, t − δ/2, t − δ, t − δ, … (descending)
            starts = np.repeat(ascending[-self.pndm_order:], 2) + np.tile([0, half], self.pndm_order)
            self.prk_timesteps = np.repeat(starts[:-1], 2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        schedule = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(schedule).to(device)
        self.num_inference_steps = n
        self._reset_state()

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        """PNDM feeds x_t to the model unscaled."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε for integer timesteps of shape () or (B,)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    # ----------------------------------------------------------------- the transfer of eq. 11
    def _alpha(self, t: int) -> float:
        """ᾱ_t; for t < 0 (after the last step) the final ᾱ (1 with set_alpha_to_one, else ᾱ_0)."""
        return self._alphas_cumprod_list[t] if t >= 0 else self.final_alpha_cumprod

    def transfer_coefficients(self, t: int, prev_t: int) -> tuple[float, float]:
        """(c_x, c_m) of x_{prev} = c_x·x_t + c_m·m, the transfer φ of Liu et al. 2022, eq. 11, from t to prev_t, with
        m the model output the step uses (ε̂, or v̂ converted to ε̂ = √ᾱ_t·v̂ + √(1 − ᾱ_t)·x_t):

            x_prev = √(ᾱ_prev/ᾱ_t)·x_t − (ᾱ_prev − ᾱ_t)/(ᾱ_t·√(1 − ᾱ_prev) + √(ᾱ_t(1 − ᾱ_t)ᾱ_prev))·ε̂.

        Computed in float64 from the fp32 ᾱ table.
        """
        a_t, a_prev = self._alpha(t), self._alpha(prev_t)
        k = (a_prev - a_t) / (a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev))
        c_x, c_m = math.sqrt(a_prev / a_t), -k
        if self.settings.prediction_type == "v_prediction":
            c_x, c_m = c_x + c_m * math.sqrt(1 - a_t), c_m * math.sqrt(a_t)
        return c_x, c_m

    def _timestep(self, timestep) -> int:
        t = as_float(timestep)
        if t != int(t) or not 0 <= t < self.settings.num_train_timesteps:
            raise ValueError(f"timestep must be an integer in [0, {self.settings.num_train_timesteps}), got {t}")
        return int(t)

    # ----------------------------------------------------------------- step
    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             guidance_scale: float | None = None):
        """One PNDM step: a PRK sub-step during the first 12 calls when the PRK steps are on, else a PLMS step.

        The arguments every scheduler takes: see :class:`~fastdiff.schedulers.base.Scheduler`. Returns x_{t−δ}
        only, as diffusers' PNDM does: a SchedulerOutput whose only field is prev_sample, or with return_dict=False
        (prev_sample,).
        """
        prk_steps = len(self.prk_timesteps) if self.prk_timesteps is not None else 0
        if self.counter < prk_steps and not self.settings.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict, guidance_scale=guidance_scale)
        return self.step_plms(model_output, timestep, sample, return_dict, guidance_scale=guidance_scale)

    def _begin(self, model_output: Tensor, timestep, sample: Tensor, guidance_scale) -> int:
        self._require_timesteps()
        check_step_inputs(model_output, sample, guidance_scale)
        return self._timestep(timestep)

    def _run(self, sample: Tensor, model_output: Tensor, inputs: list[Tensor], rows: list[list[float]],
             guidance_scale) -> list[Tensor]:
        """The step's one fused ``ops.linear_step`` call, sample and model output in one dtype."""
        work = torch.promote_types(sample.dtype, model_output.dtype)
        return ops.linear_step(sample.to(work), model_output.to(work), inputs, coefficients=rows,
                               guidance_scale=guidance_scale)

    @staticmethod
    def _output(prev_sample: Tensor, return_dict: bool):
        """x_{t−δ} alone, as diffusers' PNDM returns it: SchedulerOutput(prev_sample) or (prev_sample,)."""
        return step_output(prev_sample, None, True) if return_dict else (prev_sample,)

    def step_prk(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
                 guidance_scale: float | None = None):
        """One of the 4 sub-steps of a pseudo Runge–Kutta step (Liu et al. 2022, eq. 13), in one fused
        ``fastdiff.ops.linear_step`` call. Sub-step j of the RK step from t (counter = 4s + j) transfers the sample
        the RK step started from, x_t, with the model output m_j to t − δ/2 (j = 0, 1) or t − δ (j = 2), and at j = 3
        with ε̂' = (m_0 + 2m_1 + 2m_2 + m_3)/6 to t − δ; m_0 joins ``ets``.
        """
        t_given = self._begin(model_output, timestep, sample, guidance_scale)
        j = self.counter % 4
        # 1. the timesteps: from the RK step's start, to the timestep given (j odd) or δ/2 below it (j even)
        half = self.settings.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t_given - (0 if j % 2 else half)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        c_x, c_m = self.transfer_coefficients(t, prev_t)
        dtype = model_output.dtype
        # 2. the running sum Σ w_j·m_j (output 0 … 1), the transfer with m_j or, at j = 3, with the sum (last output)
        if j == 0:
            # out0 = m_0 (for ets), out1 = m_0/6 (the running sum), out2 = x_{prev} from this sample
            rows = [[0.0, 1.0], [0.0, 0.0, PRK_WEIGHTS[0]], [c_x, c_m, 0.0, 0.0]]
            m0, running, prev_sample = self._run(sample, model_output, [], rows, guidance_scale)
            self.ets.append(m0)
            self.cur_sample = sample
            self.cur_model_output = running
        else:
            start = self.cur_sample if self.cur_sample is not None else sample
            running = self.cur_model_output
            inputs = [running] if isinstance(running, Tensor) else []  # 0 when the RK step's first call was missed
            pad = [0.0] * len(inputs)
            summed = [0.0, PRK_WEIGHTS[j], *([1.0] * len(inputs))]
            if j < 3:  # out0 = the running sum plus w_j·m_j, out1 = the transfer with m_j
                rows = [summed, [c_x, c_m, *pad, 0.0]]
            else:  # out0 = ε̂' = the running sum plus m_3/6, out1 = the transfer with it
                rows = [summed, [c_x, 0.0, *pad, c_m]]
            running, prev_sample = self._run(start.to(sample.device), model_output, inputs, rows, guidance_scale)
            self.cur_model_output = running if j < 3 else 0
        self.counter += 1
        return self._output(prev_sample.to(dtype), return_dict)

    def step_plms(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
                  guidance_scale: float | None = None):
        """One pseudo linear multistep step (Liu et al. 2022, eq. 12) from t to t − δ, in one fused
        ``fastdiff.ops.linear_step`` call: ε̂' = Σ_k w_k·ε̂_{t+kδ} (Adams–Bashforth weights of the order the held
        ε̂'s allow, up to 4), then the transfer of eq. 11 with ε̂'. Without the PRK steps, the second call repeats
        the first's start (x and t) with ε̂' the mean of the two calls' ε̂'s.

        Raises ValueError, as diffusers does, when the PRK steps are on but have not run (fewer than 3 ε̂'s held).
        """
        t = self._begin(model_output, timestep, sample, guidance_scale)
        if not self.settings.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("step_plms needs the 12 PRK steps first (3 model outputs held) when skip_prk_steps=False: "
                             "call step() from the start of the schedule")
        delta = self.settings.num_train_timesteps // self.num_inference_steps
        dtype = model_output.dtype
        if self.counter == 1:
            # 1. the repeated step: back to the first step's start (t + δ and its sample), ε̂' = (m + ε̂_prev)/2
            c_x, c_m = self.transfer_coefficients(t + delta, t)
            start = self.cur_sample if self.cur_sample is not None else sample
            (prev_sample,) = self._run(start.to(sample.device), model_output, [self.ets[-1]],
                                       [[c_x, 0.5 * c_m, 0.5 * c_m]], guidance_scale)
            self.cur_sample = None
        else:
            # 1. m joins the history (the last 3 kept), ε̂' from all of it
            held = self.ets[-3:]
            weights = PLMS_WEIGHTS[len(held) + 1]
            c_x, c_m = self.transfer_coefficients(t, t - delta)
            # out0 = m (for ets); out1 = c_x·x + c_m·(w_0·m + Σ w_k·ε̂_{t+kδ}), the history newest first
            inputs = held[::-1]
            rows = [[0.0, 1.0, *([0.0] * len(inputs))], [c_x, c_m * weights[0], *(c_m * w for w in weights[1:]), 0.0]]
            m, prev_sample = self._run(sample, model_output, inputs, rows, guidance_scale)
            self.ets = held + [m]
            if len(self.ets) == 1 and self.counter == 0:
                self.cur_sample = sample
        self.counter += 1
        return self._output(prev_sample.to(dtype), return_dict)
