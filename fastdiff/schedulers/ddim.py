"""DDIM: the non-Markovian sampler of Song et al. 2021 (η = 0 deterministic, η = 1 DDPM-like), through the fused
fastdiff.ops.ddim_step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastdiff.schedulers.base import (
    Generator,
    SchedulerConfig,
    FusedStep,
    SchedulerOutput,
    VariancePreservingScheduler,
    as_float,
    check_step_inputs,
    randn_tensor,
)
from fastdiff.validation import check_bool, check_real


@dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    clip_sample: bool = True  # clamp the predicted x0 to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ᾱ after the last step: 1 (a clean sample) or ᾱ_0

    UNSUPPORTED: ClassVar[dict] = {"thresholding": False}
    INERT: ClassVar[tuple] = ("dynamic_thresholding_ratio", "sample_max_value")

    def __post_init__(self):
        super().__post_init__()
        check_bool("clip_sample", self.clip_sample)
        check_real("clip_sample_range", self.clip_sample_range, positive=True)
        check_bool("set_alpha_to_one", self.set_alpha_to_one)


class DDIMScheduler(VariancePreservingScheduler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12), diffusers-compatible.

    Keyword arguments: the fields of :class:`DDIMConfig` (diffusers' names and defaults). Errors: ValueError naming
    the argument for a bad value; TypeError for an unknown keyword.
    """

    config_class = DDIMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # ᾱ "before" timestep 0, used by the last step
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else self._alphas_cumprod_list[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the n timesteps to sample with (config.timestep_spacing) → ``self.timesteps``, int64 descending.

        Raises ValueError naming num_inference_steps when it is not an integer in [1, num_train_timesteps].
        """
        timesteps = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def fused_step(self, timestep, sample: Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
                   generator: Generator = None, variance_noise: Tensor | None = None) -> FusedStep:
        """Steps 1–3 of :meth:`step` (ᾱ_t, ᾱ_prev, z), as the plan of one fused ``ops.ddim_step`` call."""
        self._require_timesteps()
        # 1. the previous timestep: t − ⌊T/n⌋ for every spacing (diffusers' rule, kept for parity)
        t = self._check_timestep_range(int(as_float(timestep)))
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
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
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        options = {"eta": eta, "prediction_type": self.config.prediction_type,
                   "clip_sample_range": self.config.clip_sample_range if self.config.clip_sample else None,
                   "use_clipped_model_output": use_clipped_model_output}
        return FusedStep("ddim_step", alpha_prod_t, alpha_prod_t_prev, noise, options)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
    ):
        """x_t → x_{t−1} = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z (Song et al. 2021, eq. 12), fused in
        fastdiff.ops.ddim_step.

        Args:
            model_output: the model's prediction (config.prediction_type), sample's shape; with guidance_scale,
                (2B, ...) = [uncond; cond], combined as uncond + s·(cond − uncond) inside the fused step.
            timestep: t, an int or a scalar tensor.
            sample: x_t, (B, ...) fp32/fp16/bf16.
            eta: η ≥ 0 scales σ_t (eq. 16); 0 is deterministic DDIM.
            use_clipped_model_output: re-derive ε̂ from the clipped x̂0.
            generator: torch.Generator (or one per sample) for z when η > 0, drawn as diffusers draws it.
            variance_noise: z given directly instead of a generator.
        Returns:
            SchedulerOutput(prev_sample=x_{t−1}, pred_original_sample=x̂0), or that tuple with return_dict=False.
        """
        self._require_timesteps()
        check_step_inputs(model_output, sample, guidance_scale)
        if model_output.dtype != sample.dtype:  # the fused ops take one dtype
            model_output = model_output.to(sample.dtype)
        plan = self.fused_step(timestep, sample, eta, use_clipped_model_output, generator, variance_noise)
        # 4. x̂0 and ε̂ from the model output (x̂0 clipped), σ_t = η·√(eq. 16), then eq. 12 — one fused op
        prev_sample, x0_pred = plan.run(sample, model_output, guidance_scale)
        if not return_dict:
            return prev_sample, x0_pred
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
