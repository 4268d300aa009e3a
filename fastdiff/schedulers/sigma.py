"""The σ-space family (DPM-Solver, Euler, Euler ancestral): schedulers that step in the variance-exploding noise
level σ = √((1 − ᾱ)/ᾱ) — the step counter, the σ tables, add_noise — and, for the Euler pair (x = x0 + σ·ε, the
model fed x/√(σ² + 1)), model-input scaling, x̂0 from the model output and the Euler step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import (
    Scheduler,
    StepCounter,
    broadcast_to,
    check_add_noise,
    check_step_inputs,
    step_output,
)
from fastdiff.schedulers.schedules import train_sigmas


class SigmaScheduler(StepCounter, Scheduler):
    """Schedulers that step in σ (variance-exploding) space, DPM-Solver and Euler: a step counter, σ tables, add_noise.

    ``self.sigmas`` holds σ for each inference timestep plus the final σ (fp32 CPU, n + 1); ``self.timesteps`` the n
    timesteps the model sees. The counter starts at the index of the first timestep passed to step() (or at
    ``set_begin_index``) and advances by one per step, as in diffusers.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.settings.rescale_betas_zero_snr:
            # ᾱ_T = 0 would make σ_T infinite: keep it tiny instead (as diffusers does)
            self.alphas_cumprod[-1] = 2**-24
        self._train_sigmas = train_sigmas(self.alphas_cumprod)  # (T,) fp32, ascending in t
        self._log_sigmas = np.log(self._train_sigmas)
        T = self.settings.num_train_timesteps
        # before set_timesteps: the whole training chain (only add_noise uses it)
        self._set_schedule(np.arange(T - 1, -1, -1, dtype=np.float64), self._train_sigmas[::-1], 0.0, None)
        self.num_inference_steps = None

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last: float, device,
                      timestep_dtype: torch.dtype = torch.float32) -> None:
        sigmas = np.concatenate([np.asarray(sigmas, dtype=np.float64), [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)  # (n + 1,) fp32 on the CPU
        self._sigma_list = sigmas.tolist()  # the same values as Python floats, read by step()
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=timestep_dtype)
        self._timestep_list = self.timesteps.tolist()
        self.num_inference_steps = len(timesteps)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _last_sigma(self, final_sigmas_type: str) -> float:
        """σ after the last step: 0 ("zero", a clean sample) or σ at training timestep 0 ("sigma_min")."""
        return 0.0 if final_sigmas_type == "zero" else float(self._train_sigmas[0])

    def _sigma_indices(self, timesteps: Tensor) -> list[int]:
        """Schedule index of each timestep, for add_noise (the running index once a pipeline has set a begin index)."""
        n = timesteps.numel()
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten().tolist()]
        return [self._step_index if self._step_index is not None else self._begin_index] * n

    def _add_noise_sigma(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The start of add_noise(): its inputs checked, and σ at each timestep's place in the schedule as
        (B, 1, ..., 1) in the samples' device and dtype."""
        check_add_noise(original_samples, noise)
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        return broadcast_to(sigmas[self._sigma_indices(torch.as_tensor(timesteps))], original_samples)

    def _end_step(self, prev_sample: Tensor, x0_pred: Tensor | None, dtype: torch.dtype, return_dict: bool):
        """The end of step(): x_{i+1} in ``dtype`` (the model output's), the counter advanced, the output returned."""
        prev_sample = prev_sample.to(dtype)
        self._step_index += 1
        return step_output(prev_sample, x0_pred, return_dict)


class VarianceExplodingScheduler(SigmaScheduler):
    """Samplers of x = x0 + σ·ε (Euler, Euler ancestral): x_T has std σ_max and the model sees x/√(σ² + 1)."""

    def _require_timesteps(self) -> None:
        """Nothing to require: before set_timesteps the schedule is the training chain (T timesteps, the training
        σ's), and scale_model_input / step run on it, as in diffusers."""

    @property
    def init_noise_sigma(self) -> Tensor:
        """σ of x_T: σ_max ("linspace"/"trailing"), or √(σ_max² + 1) ("leading"), as in diffusers: a 0-dim fp32 CPU
        tensor (as diffusers gives it; it scales a tensor on any device like a number)."""
        sigma_max = max(self._sigma_list)
        value = sigma_max if self.settings.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
        return torch.tensor(value, dtype=torch.float32)

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """x/√(σ² + 1), the variance-preserving x_t the model was trained on (Karras et al. 2022, Table 1, c_in)."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._sigma_list[self._step_index]
        return sample / math.sqrt(sigma**2 + 1)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = x0 + σ·ε at the σ of each timestep's place in the schedule; timesteps () or (B,)."""
        return original_samples + noise * self._add_noise_sigma(original_samples, noise, timesteps)

    def _begin_step(self, model_output: Tensor, timestep, sample: Tensor,
                    guidance_scale: float | None) -> tuple[Tensor, Tensor, float, float, torch.dtype]:
        """The start of step(): the inputs checked, and (model output, sample, σ_i, σ_{i+1}, the output dtype) for
        this call's place in the schedule; model output and sample in one dtype (fp32 where they differ). Guidance
        is not applied here: the fused op combines [uncond; cond] itself."""
        check_step_inputs(model_output, sample, guidance_scale)
        i = self._current_step(timestep)
        dtype = model_output.dtype
        if model_output.dtype != sample.dtype:
            model_output, sample = model_output.float(), sample.float()
        return model_output, sample, self._sigma_list[i], self._sigma_list[i + 1], dtype


def x0_weights(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with the denoiser D(x; σ) = x̂0 = a·x + b·m for the model output m of each parameterisation, with
    x = x0 + σ·ε (VE) and the model fed x/√(σ² + 1), in float64: ε-prediction x − σ·ε̂; x0-prediction as is;
    v-prediction x/(σ² + 1) − σ/√(σ² + 1)·v̂."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
