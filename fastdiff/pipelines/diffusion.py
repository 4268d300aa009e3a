"""Diffusion sampling pipelines: pixel space (:class:`DiffusionPipeline`) and latent space with a VAE
(:class:`LatentDiffusionPipeline`), both with class labels or a context sequence and classifier-free guidance.

Guidance batches [uncond; cond] through one UNet call; with a DDIM/DDPM scheduler the combine
uncond + s·(cond − uncond) happens inside the fused step kernel (fastdiff.ops.ddim_step / ddpm_step). A
guidance-distilled UNet (``config.guidance_embedding_dim``, the LCM recipe) takes the scale as an input instead: one
conditional evaluation per step, no guidance in the scheduler.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastdiff.pipelines.base import (
    OUTPUT_TYPES,
    GeneratorArg,
    NonFiniteError,
    Pipeline,
    make_generator,
    to_output,
)
from fastdiff.schedulers.base import randn_tensor
from fastdiff.validation import check_positive_int, check_real

Labels = Union[None, int, Sequence[int], Tensor]


def _size_pair(sample_size) -> tuple[int, int]:
    if isinstance(sample_size, numbers.Integral):
        return int(sample_size), int(sample_size)
    h, w = sample_size
    return int(h), int(w)



@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    """The parameter names of a scheduler class's step() (read once per class)."""
    return frozenset(inspect.signature(scheduler_class.step).parameters)

def check_class_labels(class_labels: Labels, batch_size: Optional[int], num_classes: int) -> Tensor:
    """``class_labels`` (an int — repeated ``batch_size`` times, once without one —, a sequence or a tensor of ints)
    as a (B,) int64 CPU tensor with values in [0, num_classes); B must equal ``batch_size`` when it is given.
    ValueError naming class_labels (or batch_size) otherwise."""
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
        count = 1 if batch_size is None else check_positive_int("batch_size", batch_size)
        class_labels = [int(class_labels)] * count
    labels = torch.as_tensor(class_labels).flatten()
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("class_labels must not be empty")
    if batch_size is not None and labels.numel() != batch_size:
        raise ValueError(f"class_labels has {labels.numel()} labels but batch_size is {batch_size}")
    labels = labels.cpu().long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class_labels must be in [0, {num_classes}), got {labels.tolist()}")
    return labels


class DiffusionPipeline(Pipeline):
    """Pixel-space diffusion sampling: ``DiffusionPipeline(unet, scheduler, sample_size=32)``.

    ``pipe(batch_size, num_inference_steps, generator, guidance_scale, class_labels, output_type, progress)``
    → a list of PIL images, a (B, H, W, C) float array in [0, 1] ("np") or a (B, C, H, W) tensor ("pt").
    """

    component_names = ("unet", "scheduler")

    def __init__(self, unet, scheduler, sample_size: Union[int, tuple[int, int], None] = None):
        super().__init__(unet=unet, scheduler=scheduler)
        if sample_size is None:
            sample_size = getattr(unet.config, "sample_size", None)
        if sample_size is None:
            raise ValueError("sample_size is required (the image size the UNet was trained on)")
        self.settings = {"sample_size": sample_size}

    # ----------------------------------------------------------------- what the loop samples
    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        h, w = _size_pair(self.settings["sample_size"])
        return (batch_size, self.unet.config.in_channels, h, w)

    def _decode(self, latents: Tensor) -> Tensor:
        return latents

    def _denoiser(self, unet, cfg: bool):
        """The model the denoising loop calls: ``unet`` (``self.unet``, or its compiled callable after
        :meth:`compile`) by default. Called once per sampling call, inside it (inference mode), after the noise and
        timesteps are set; ``cfg``: the batch is [uncond; cond]. A subclass returns another callable with the UNet's
        forward signature ``(x, t, class_labels=, context=, **kwargs)`` to add a conditioning model without a loop of
        its own (:class:`TextToImagePipeline`: the ControlNet, :class:`fastdiff.pipelines.controlnet.ControlledUNet`).
        With CUDA graphs (``unet`` is then ``self.unet``) the returned model is what is fingerprinted and captured,
        so it must be an ``nn.Module`` holding every model it runs, and keep its per-call inputs in tensors at
        fixed addresses."""
        return unet

    # ----------------------------------------------------------------- argument checks (before any work)
    def _check_labels(self, class_labels: Labels, batch_size: int) -> Optional[Tensor]:
        num_classes = getattr(self.unet.config, "num_classes", None)
        if class_labels is None:
            return None
        if num_classes is None:
            raise ValueError("class_labels given but the UNet is unconditional (its config has no num_classes)")
        return check_class_labels(class_labels, batch_size, num_classes)

    def _check_run(self, batch_size, num_inference_steps, output_type) -> tuple[int, int]:
        """The checks of the batch size, step count and output type (batch_size, num_inference_steps as ints)."""
        batch_size = check_positive_int("batch_size", batch_size)
        num_train = self.scheduler.config.num_train_timesteps
        num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps, maximum=num_train)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        return batch_size, num_inference_steps

    def _check_call(self, batch_size, num_inference_steps, guidance_scale, class_labels, context, output_type):
        batch_size, num_inference_steps = self._check_run(batch_size, num_inference_steps, output_type)
        labels = self._check_labels(class_labels, batch_size)
        context_dim = getattr(self.unet.config, "context_dim", None)
        if context is not None:
            if context_dim is None:
                raise ValueError("context given but the UNet has no cross-attention (its config has no context_dim)")
            if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[-1] != context_dim:
                raise ValueError(f"context must be a (B, M, {context_dim}) tensor, got "
                                 f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}")
            if context.shape[0] not in (1, batch_size):
                raise ValueError(f"context batch must be 1 or batch_size={batch_size}, got {context.shape[0]}")
        elif context_dim is not None:
            raise ValueError(f"this UNet cross-attends to a context: pass context of shape (B, M, {context_dim})")
        if guidance_scale is not None:
            check_real("guidance_scale", guidance_scale)
            if getattr(self.unet.config, "num_classes", None) is None and context_dim is None:
                raise ValueError("guidance_scale needs a class-conditional or context-conditioned UNet")
            if labels is None and context is None:
                raise ValueError("guidance_scale needs class_labels (or a context) to guide towards")
        return batch_size, num_inference_steps, labels

    # ----------------------------------------------------------------- sampling
    @torch.inference_mode()
    def __call__(
        self,
        batch_size: int = 16,
        num_inference_steps: int = 50,
        generator: GeneratorArg = None,
        guidance_scale: Optional[float] = None,
        class_labels: Labels = None,
        output_type: str = "pil",
        progress: bool = True,
        *,
        eta: float = 0.0,
        context: Optional[Tensor] = None,
        negative_context: Optional[Tensor] = None,
        latents: Optional[Tensor] = None,
    ):
        """Sample ``batch_size`` images.

        Args:
            batch_size: images to make, an integer ≥ 1.
            num_inference_steps: sampler steps, an integer in [1, num_train_timesteps].
            generator: an int seed (a fresh CPU generator), a torch.Generator (or a list, one per image) or None.
            guidance_scale: classifier-free guidance scale s, a real number; None: no guidance. Any value, 1.0
                included, needs a class-conditional or context-conditioned UNet and class_labels or a context;
                1.0 then samples the conditional model alone (no unconditional batch). A guidance-distilled UNet
                (``config.guidance_embedding_dim``) gets s as its ``guidance`` input w (None: w = 1) and runs once
                per step on the conditional inputs; the scheduler then does no guidance.
            class_labels: an int, or B ints in [0, num_classes), for a class-conditional UNet.
            output_type: "pil" (list of PIL images), "np" ((B, H, W, C) float32 in [0, 1]) or "pt" ((B, C, H, W)
                float32 CPU tensor in [0, 1]).
            progress: show a tqdm bar.
            eta: DDIM's η, passed to the scheduler's step only when nonzero (a nonzero η with another scheduler
                fails there, at the first step, with the scheduler's TypeError).
            context: (B or 1, M, context_dim) for a cross-attention UNet; negative_context the unconditional one
                (zeros by default).
            latents: the initial noise (B, C, h, w) instead of drawing it (scaled by the scheduler's
                init_noise_sigma, as a drawn one is).
        Raises:
            TypeError: an argument of the wrong type, naming it, before any work: batch_size or
                num_inference_steps not an integer (bools and floats included), guidance_scale not a real number,
                generator not one of the kinds above.
            ValueError: an argument with a wrong value, naming it, before any work: batch_size < 1,
                num_inference_steps outside [1, num_train_timesteps], an unknown output_type, class_labels for an
                unconditional UNet or of the wrong count, dtype or range, a context (not a (B or 1, M, context_dim)
                tensor — a non-tensor too) or its absence where the UNet needs one, guidance_scale without
                conditioning, latents of the wrong shape.
            NonFiniteError: NaN/Inf appeared in the latents (naming the step).
        """
        batch_size, num_inference_steps, labels = self._check_call(
            batch_size, num_inference_steps, guidance_scale, class_labels, context, output_type)
        self._prefer_channels_last()
        device, dtype = self.device, self.dtype
        # The sampler's state: on the CPU always fp32 (a bf16 model computes in bf16, the latents between steps keep
        # fp32, and the same seed draws the same x_T in every dtype); on CUDA the model's dtype (its graphs and fused
        # steps run in it).
        state_dtype = torch.float32 if device.type == "cpu" else dtype
        generator = make_generator(generator, device)
        # a guidance-distilled UNet follows w itself: one conditional evaluation per step replaces [uncond; cond]
        distilled = getattr(self.unet.config, "guidance_embedding_dim", None) is not None
        cfg = not distilled and guidance_scale is not None and float(guidance_scale) != 1.0
        model_kwargs = {}
        if distilled:
            w = 1.0 if guidance_scale is None else float(guidance_scale)
            model_kwargs["guidance"] = torch.full((batch_size,), w, device=device, dtype=torch.float32)

        # 1. conditioning, batched [uncond; cond] under guidance
        model_labels = None
        if labels is not None:
            model_labels = labels.to(device)
            if cfg:
                null = torch.full_like(model_labels, self.unet.config.num_classes)
                model_labels = torch.cat([null, model_labels])
        model_context = None
        if context is not None:
            model_context = context.to(device, dtype).expand(batch_size, -1, -1)
            if cfg:
                uncond = (torch.zeros_like(model_context) if negative_context is None
                          else negative_context.to(device, dtype).expand_as(model_context))
                model_context = torch.cat([uncond, model_context])

        # 2. initial noise x_T
        shape = self._latent_shape(batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=state_dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device, state_dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        # the generator goes to schedulers whose step() draws noise (takes ``generator``); LMS, PNDM, ... do not
        step_kwargs = {"generator": generator} if "generator" in _step_parameters(type(self.scheduler)) else {}
        if eta:
            step_kwargs["eta"] = eta
        if cfg:
            step_kwargs["guidance_scale"] = float(guidance_scale)

        # 3. the denoising loop; CUDA graphs only on CUDA, the model's fingerprint checked once per call (its graphs
        #    are captured again if its weights or modules were replaced since)
        # (the graphs capture the UNet call without a guidance input: a guidance-distilled UNet runs without them)
        # The model called: the UNet (compiled by compile()), or what a subclass's ``_denoiser`` makes of it (the UNet
        # with its ControlNet); CUDA graphs capture and fingerprint that whole model.
        graphs = self._cuda_graphs if device.type == "cuda" and not distilled else None
        unet = self.unet
        if self._compiled is not None:  # compile(): the compiled UNet (compiled again if frozen weights changed)
            self._compiled.check(self.unet)
            unet = self._compiled
        denoiser = self._denoiser(unet, cfg)
        if graphs is not None:
            graphs.check(denoiser)
        timesteps = self.scheduler.timesteps.tolist()  # one host copy, not one sync per step
        first_bad = None if device.type == "cpu" else torch.full((), -1, device=device, dtype=torch.int64)
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t).to(dtype)
            t_batch = torch.full((model_in.shape[0],), t, device=device, dtype=torch.float32)
            if graphs is not None and getattr(self.scheduler, "has_fused_step", False):
                # DDIM/DDPM: the UNet call and the fused update replay as one graph
                plan = self.scheduler.fused_step(t, latents, **{k: v for k, v in step_kwargs.items()
                                                                 if k != "guidance_scale"})
                latents = graphs.run_step(denoiser, plan, step_kwargs.get("guidance_scale"), model_in, t_batch,
                                          model_labels, model_context, latents)
            else:
                if graphs is not None:
                    out = graphs.run(denoiser, model_in, t_batch, model_labels, model_context)
                else:
                    out = denoiser(model_in, t_batch, class_labels=model_labels, context=model_context, **model_kwargs)
                latents = self.scheduler.step(out.to(state_dtype), t, latents, **step_kwargs).prev_sample
            # 4. stop on NaN/Inf, naming the step (on CUDA the check stays on the device until the end)
            finite = torch.isfinite(latents).all()
            if first_bad is None:
                if not finite:
                    raise NonFiniteError(f"NaN/Inf in the latents at step {i + 1}/{len(timesteps)} (t={t})")
            else:
                first_bad = torch.where((first_bad < 0) & ~finite, i, first_bad)
        if first_bad is not None and int(first_bad) >= 0:
            bad = int(first_bad)
            raise NonFiniteError(f"NaN/Inf in the latents at step {bad + 1}/{len(timesteps)} (t={timesteps[bad]})")

        images = self._decode(latents.to(dtype))
        return to_output(images, output_type)


class LatentDiffusionPipeline(DiffusionPipeline):
    """Latent diffusion: the UNet denoises VAE latents, the VAE decodes them.
    ``LatentDiffusionPipeline(unet, vae, scheduler, sample_size=latent_size)``; sample_size is the latent size."""

    component_names = ("unet", "vae", "scheduler")

    def __init__(self, unet, vae, scheduler, sample_size: Union[int, tuple[int, int], None] = None):
        super().__init__(unet, scheduler, sample_size)
        self.vae = vae

    def _decode(self, latents: Tensor) -> Tensor:
        z = latents / getattr(self.vae.config, "scaling_factor", 1.0)
        shift = getattr(self.vae.config, "shift_factor", None)
        return self.vae.decode(z + shift if shift else z)
