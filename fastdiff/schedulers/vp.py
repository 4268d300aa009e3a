"""The variance-preserving family (DDPM, DDIM): x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε. Holds their shared base class (the
forward process, the timestep checks and the whole of step()) and the fused-step plan, :class:`FusedStep`: one
update as the fused ``fastdiff.ops.ddim_step`` / ``ddpm_step`` takes it, run at once by step() or captured in a CUDA
graph by the pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedulers.base import Scheduler, as_float, broadcast_to, check_add_noise, check_step_inputs, step_output
from fastdiff.schedulers.config import ClipSampleConfig


def alpha_arg(alpha_prod: float, sample: Tensor):
    """ᾱ_t as the fused steps take it: a Python float. ᾱ_T = 0 (zero terminal SNR) is outside the ops' range check
    (0 < ᾱ_t), so it goes as a per-sample (B,) tensor, whose values the ops do not check."""
    if alpha_prod > 0.0:
        return alpha_prod
    return torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)


def add_noise_vp(alphas_cumprod: Tensor, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
    """The forward process q(x_t | x0): x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (Ho et al. 2020, eq. 4); timesteps () or (B,)."""
    check_add_noise(original_samples, noise)
    timesteps = torch.as_tensor(timesteps)
    in_range = timesteps.device.type != "cpu" or not timesteps.numel() or (  # no device sync for GPU timesteps
        0 <= int(timesteps.min()) and int(timesteps.max()) < len(alphas_cumprod))
    if not in_range:
        raise ValueError(f"timesteps must be in [0, {len(alphas_cumprod)}), got {timesteps.tolist()}")
    alpha_prod = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    timesteps = timesteps.to(original_samples.device).long()
    alpha_prod_t = broadcast_to(alpha_prod[timesteps], original_samples)
    return alpha_prod_t**0.5 * original_samples + (1 - alpha_prod_t) ** 0.5 * noise


@dataclass
class FusedStep:
    """One DDIM/DDPM update as the fused op takes it: which op, ᾱ_t and ᾱ_prev (floats), the noise z (or None) and
    the op's fixed options. ``step()`` runs it at once; a CUDA graph captures the op with ᾱ as (B,) device tensors
    and replays it with this plan's values filled in."""

    op: str  # "ddim_step" or "ddpm_step" (fastdiff.ops)
    alpha_prod_t: float
    alpha_prod_t_prev: float
    noise: Tensor | None
    options: dict[str, Any]

    def run(self, sample: Tensor, model_output: Tensor, guidance_scale: float | None = None,
            alpha_prod_t=None, alpha_prod_t_prev=None) -> tuple[Tensor, Tensor]:
        """(prev_sample, pred_original_sample); the alphas default to this plan's floats (a tensor may replace them)."""
        from fastdiff import ops, reference

        a_t = alpha_arg(self.alpha_prod_t, sample) if alpha_prod_t is None else alpha_prod_t
        a_prev = self.alpha_prod_t_prev if alpha_prod_t_prev is None else alpha_prod_t_prev
        # dynamic thresholding needs a per-sample quantile: the reference's torch code, not a fused op
        run = reference if "threshold" in self.options else ops
        return getattr(run, self.op)(sample, model_output, a_t, a_prev, noise=self.noise,
                                     guidance_scale=guidance_scale, **self.options)


class VariancePreservingScheduler(Scheduler):
    """Samplers of x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (DDPM, DDIM): x_T ~ N(0, I), the model sees x_t unscaled, and step()
    reads ᾱ_t as a Python float. Before set_timesteps, ``timesteps`` is the whole training chain, int64 descending.

    A subclass plans one update in ``fused_step(timestep, sample, ...)`` (a :class:`FusedStep`), and its step() is
    :meth:`_fused_step_output` of that plan.
    """

    config_class = ClipSampleConfig
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._alphas_cumprod_list = self.alphas_cumprod.tolist()
        T = self.settings.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.int64)
        self._timestep_list: list[int] = self.timesteps.tolist()

    def _set_schedule(self, timesteps: np.ndarray, device) -> None:
        """Sample with these int64 descending timesteps from now on."""
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._timestep_list = timesteps.tolist()

    @property
    def has_fused_step(self) -> bool:
        """Whether ``fused_step()`` plans this scheduler's update as one fused op (what a CUDA graph replays): not
        with dynamic thresholding, whose per-sample quantile runs the reference's torch code."""
        return not self.settings.thresholding

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """DDPM and DDIM feed x_t to the model unscaled."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε for integer timesteps of shape () or (B,)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022, §4)."""
        alpha_prod = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha_prod_t = broadcast_to(alpha_prod[torch.as_tensor(timesteps, device=sample.device).long()], sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule, −1 after the last (then ᾱ_prev = 1); before
        set_timesteps, t − 1 (the training chain). As in diffusers: after set_timesteps a tensor (on the timesteps'
        device); before, ``timestep − 1`` in timestep's own type."""
        if self.num_inference_steps is None:
            return timestep - 1
        return torch.tensor(self._previous_timestep(int(as_float(timestep))), device=self.timesteps.device)

    def _previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        try:
            i = self._timestep_list.index(t)
        except ValueError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self._timestep_list}") from None
        return self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else -1

    # ----------------------------------------------------------------- the step, shared by DDPM and DDIM
    def _plan_timestep(self, timestep) -> int:
        """The start of fused_step(): t as an int, after set_timesteps; ValueError when it is outside [0, T)."""
        self._require_timesteps()
        t = int(as_float(timestep))
        if not 0 <= t < self.settings.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.settings.num_train_timesteps}), got {t}")
        return t

    def _fused_options(self, **options) -> dict[str, Any]:
        """The fused op's fixed options: the config's prediction type and x̂0 clamp, and ``options``."""
        cfg = self.settings
        if cfg.thresholding:  # it takes precedence over clip_sample, as in diffusers
            return {"prediction_type": cfg.prediction_type, "clip_sample_range": None, "threshold": cfg.threshold(),
                    **options}
        clip_sample_range = cfg.clip_sample_range if cfg.clip_sample else None
        return {"prediction_type": cfg.prediction_type, "clip_sample_range": clip_sample_range, **options}

    def _fused_step_output(self, model_output: Tensor, sample: Tensor, guidance_scale: float | None,
                           return_dict: bool, plan: Callable[[], FusedStep]):
        """The whole of step(): check the inputs, make the plan (``plan()``), and run it as one fused op — x̂0 from
        the model output (clipped), the update, and the noise, with classifier-free guidance inside."""
        self._require_timesteps()
        check_step_inputs(model_output, sample, guidance_scale)
        if model_output.dtype != sample.dtype:  # the fused ops take one dtype
            model_output = model_output.to(sample.dtype)
        prev_sample, x0_pred = plan().run(sample, model_output, guidance_scale)
        return step_output(prev_sample, x0_pred, return_dict)
