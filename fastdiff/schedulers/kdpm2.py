"""KDPM2: the second-order DPM-Solver step in σ space (Lu et al. 2022a, DPM-Solver-2, as k-diffusion's
``sample_dpm_2`` writes it; Karras et al. 2022, §3 on σ-space solvers), diffusers' KDPM2DiscreteScheduler.

Each step from σ_i to σ_{i+1} takes two model calls at σ_i and at the midpoint σ_mid = √(σ_i·σ_{i+1}) (the
geometric mean: the midpoint in log σ):

1. at σ_i: d_i = (x_i − x̂0(x_i; σ_i))/σ_i and the Euler half step x_mid = x_i + (σ_mid − σ_i)·d_i;
2. at σ_mid: d_mid = (x_mid − x̂0(x_mid; σ_mid))/σ_mid and the full step x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_mid.

The last step (to σ = 0, whose midpoint is 0) is the Euler half step alone. The schedule interleaves the timesteps of
σ_i and σ_mid (diffusers' layout, ``order = 2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.heun import TwoStageSigmaConfig, TwoStageSigmaScheduler


@dataclass(frozen=True)
class KDPM2DiscreteConfig(TwoStageSigmaConfig):
    """KDPM2's fields: the shared ones of Heun and KDPM2 (:class:`~fastdiff.schedulers.heun.TwoStageSigmaConfig`).
    prediction_type="sample" is accepted here, as diffusers accepts it, and refused by step() (NotImplementedError),
    as diffusers refuses it."""


def sigma_to_t_fp32(sigmas: Tensor, log_sigmas: Tensor) -> Tensor:
    """The fractional training timestep of each σ, by linear interpolation in log σ, computed in fp32 throughout
    (diffusers forms the midpoints' timesteps so; the fp32 rounding shows in the timesteps the model sees).

    sigmas: (k,) fp32; log_sigmas: (T,) fp32 log σ_t, ascending. Values outside the range clamp to 0 or T − 1.
    """
    # numpy's fp32 log, as diffusers takes it (torch's log differs in the last bit for some σ)
    log_sigma = torch.from_numpy(np.log(np.maximum(sigmas.numpy(), np.float32(1e-10))))
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return (1 - w) * low + w * high


class KDPM2DiscreteScheduler(TwoStageSigmaScheduler):
    """KDPM2 (DPM-Solver-2 in σ space, k-diffusion's ``sample_dpm_2``), diffusers-compatible; configured by
    :class:`KDPM2DiscreteConfig`. Timesteps are fp32, or float64 with Karras / exponential / beta σ's (as in
    diffusers).

    ``sigmas_interpol`` holds σ_mid laid out like ``sigmas``; between the two stages of a step it keeps ``sample``
    (x_i, diffusers' name); ``state_in_first_order`` is True when the next call is a first stage.
    """

    config_class = KDPM2DiscreteConfig

    def _reset_stage(self) -> None:
        self.sample: Tensor | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is the first stage of a step (at σ_i)."""
        return self.sample is None

    def _set_two_stage_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        """sigmas [σ_0, σ_1, σ_1, ..., σ_{n−1}, σ_{n−1}, 0, 0, 0] (2n + 2), sigmas_interpol the same layout of
        σ_mid,i = √(σ_{i−1}·σ_i) (NaN at 0, unused), and timesteps [t_0, t(σ_mid,1), t_1, ..., t(σ_mid,n−1),
        t_{n−1}] (2n − 1): a stage at index 2i + 1 steps from σ_i = sigmas[2i] through sigmas_interpol[2i + 1]."""
        n = len(timesteps)
        short = torch.from_numpy(np.concatenate([np.asarray(sigmas, dtype=np.float64), [0.0]]).astype(np.float32))
        log_short = short.log()
        mid = torch.lerp(log_short, log_short.roll(1), 0.5).exp()  # in log σ, fp32 as diffusers forms it
        long = torch.cat([short[:1], short[1:].repeat_interleave(2), short[-1:]])
        self._sigma_interpol_list = torch.cat([mid[:1], mid[1:].repeat_interleave(2), mid[-1:]]).tolist()
        # fp32 timesteps from the spacing, float64 where they were read back from re-spaced σ's (diffusers' dtypes)
        times = np.asarray(timesteps)
        if self.settings.use_karras_sigmas:
            times = times.round()
        dtype = torch.float32 if times.dtype == np.float32 else torch.float64
        times = torch.from_numpy(times)
        mid_times = sigma_to_t_fp32(mid[1:-1], torch.from_numpy(self._log_sigmas)).to(dtype)
        times = torch.cat([times[:1], torch.stack([mid_times, times[1:]], dim=-1).flatten()])
        self._set_interleaved(times.numpy(), long, n, device, dtype)

    @property
    def sigmas_interpol(self) -> Tensor:
        """σ_mid in the layout of ``sigmas`` (fp32, CPU)."""
        return torch.tensor(self._sigma_interpol_list, dtype=torch.float32)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None) -> None:
        """Choose n steps (config.timestep_spacing over ``num_train_timesteps`` training steps, default the config's;
        then Karras σ with rounded timesteps, or exponential / beta σ), and lay them out for the two stages (see
        :meth:`_set_two_stage_schedule`).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or steps_offset.
        """
        T = self.settings.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
        self._set_two_stage_schedule(*self._base_schedule(num_inference_steps, None, T), device=device)
        self._reset_stage()

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """x/√(σ² + 1) at this stage's σ: σ_i on a first stage, σ_mid on a second."""
        if self._step_index is None:
            self._init_step_index(timestep)
        table = self._sigma_list if self.state_in_first_order else self._sigma_interpol_list
        sigma = table[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             guidance_scale: float | None = None):
        """One stage of a KDPM2 step (see the module docstring): the half step to σ_mid on a first stage, the full
        step from x_i with the midpoint's derivative on a second; each is one ``ops.linear_step`` call.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler` (KDPM2 draws no noise). Returns x_next
        (x_mid after a first stage, x_{i+1} after a second) and x̂0 at this stage's σ. Raises NotImplementedError for
        prediction_type="sample", as diffusers does.
        """
        if self.settings.prediction_type == "sample":
            raise NotImplementedError("KDPM2DiscreteScheduler.step: prediction_type='sample' is not implemented "
                                      "(nor in diffusers); use 'epsilon' or 'v_prediction'")
        dtype = model_output.dtype
        model_output, i = self._step_inputs(model_output, timestep, sample, guidance_scale)
        if self.state_in_first_order:
            sigma, sigma_mid = self._sigma_list[i], self._sigma_interpol_list[i + 1]
            dt = sigma_mid - sigma
            # 1. x̂0 at σ_i; 2. x_mid = x + (σ_mid − σ_i)·(x − x̂0)/σ_i, straight from x and m (float64 coefficients)
            a, b = self._x0_row(sigma)
            rows = [[a, b], [1.0 + dt * (1.0 - a) / sigma, -dt * b / sigma, 0.0]]
            x0_pred, prev_sample = ops.linear_step(sample, model_output, [], coefficients=rows,
                                                   guidance_scale=guidance_scale)
            self.sample = sample
        else:
            sigma, sigma_mid = self._sigma_list[i - 1], self._sigma_interpol_list[i]
            dt = self._sigma_list[i] - sigma  # σ_{i+1} − σ_i
            # 1. x̂0 at σ_mid; 2. x_{i+1} = x_i + (σ_{i+1} − σ_i)·(x_mid − x̂0)/σ_mid (operands: x_mid, m, x_i, x̂0)
            a, b = self._x0_row(sigma_mid)
            rows = [[a, b, 0.0], [dt * (1.0 - a) / sigma_mid, -dt * b / sigma_mid, 1.0, 0.0]]
            x0_pred, prev_sample = ops.linear_step(sample, model_output, [self.sample], coefficients=rows,
                                                   guidance_scale=guidance_scale)
            self._reset_stage()
        return self._end_step(prev_sample, x0_pred, dtype, return_dict)
