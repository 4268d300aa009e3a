"""DDIM: the non-Markovian sampler of Song et al. 2021 (η = 0 deterministic, η = 1 DDPM-like), through the fused
fastdiff.ops.ddim_step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fastdiff.schedulers.base import Generator, randn_like
from fastdiff.schedulers.config import ClipSampleConfig
from fastdiff.schedulers.vp import FusedStep, VariancePreservingScheduler
from fastdiff.validation import check_real


@dataclass(frozen=True)
class DDIMConfig(ClipSampleConfig):
    set_alpha_to_one: bool = True  # ᾱ after the last step: 1 (a clean sample) or ᾱ_0


class DDIMScheduler(VariancePreservingScheduler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12), diffusers-compatible; configured by
    :class:`DDIMConfig`."""

    config_class = DDIMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # ᾱ "before" timestep 0, used by the last step
        self.final_alpha_cumprod = 1.0 if self.settings.set_alpha_to_one else self._alphas_cumprod_list[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the n timesteps to sample with (config.timestep_spacing) → ``self.timesteps``, int64 descending.

        Raises ValueError naming num_inference_steps when it is not an integer in [1, num_train_timesteps].
        """
        self._set_schedule(self._spaced_timesteps(num_inference_steps, np.int64), device)

    def fused_step(self, timestep, sample: Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
                   generator: Generator = None, variance_noise: Tensor | None = None) -> FusedStep:
        """The plan of one fused ``ops.ddim_step`` call (ᾱ_t, ᾱ_prev, z), which :meth:`step` runs at once."""
        # 1. the previous timestep: t − ⌊T/n⌋ for every spacing (diffusers' rule, kept for parity)
        t = self._plan_timestep(timestep)
        prev_t = t - self.settings.num_train_timesteps // self.num_inference_steps
        # 2. ᾱ_t and ᾱ_prev
        alpha_prod_t = self._alphas_cumprod_list[t]
        alpha_prod_t_prev = self._alphas_cumprod_list[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        # 3. z ~ N(0, I) when η > 0
        eta = check_real("eta", eta)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_like(sample, generator)
        options = self._fused_options(eta=eta, use_clipped_model_output=use_clipped_model_output)
        return FusedStep("ddim_step", alpha_prod_t, alpha_prod_t_prev, noise, options)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: bool = True, *, guidance_scale: float | None = None):
        """x_t → x_{t−1} = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z (Song et al. 2021, eq. 12), in one fused
        fastdiff.ops.ddim_step: x̂0 and ε̂ from the model output (x̂0 clipped), σ_t = η·√(eq. 16), then eq. 12.

        The arguments every scheduler takes: see :class:`~fastdiff.schedulers.base.Scheduler`. Besides:
            eta: η ≥ 0 scales σ_t (eq. 16); 0 is deterministic DDIM (no noise drawn).
            use_clipped_model_output: re-derive ε̂ from the clipped x̂0.
            variance_noise: z given directly instead of a generator.
        Returns x_{t−1} and x̂0.
        """
        return self._fused_step_output(model_output, sample, guidance_scale, return_dict, lambda: self.fused_step(
            timestep, sample, eta, use_clipped_model_output, generator, variance_noise))
