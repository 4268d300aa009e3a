"""The models that ship inside the package, by name, and how to sample them: ``fastdiff.list_models()``,
``fastdiff.load(name, sampler=..., device=..., dtype=...)`` and the per-model sampling defaults.

Each shipped model is a pipeline folder under ``fastdiff/assets/<name>/`` (``model_index.json``, one subfolder per
component, ``MODEL_CARD.md``). Nothing is downloaded: a name that is not shipped is an error.

This module is the one home of what the command (``fastdiff sample / eval / generate``) and the library share:
the sampler names (:data:`SAMPLERS`), the sampler swap, device and dtype resolution, and the sampling defaults of a
model (:func:`sampling_defaults`: class labels cycling 0 … num_classes − 1 — for a text-to-image model the labels
stand for the prompts "0" … "9" —, the model's default steps and guidance, GANs take no steps). Errors are
``ValueError`` / ``TypeError`` naming the argument as the command spells it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from fastdiff.assets import ASSETS, list_models
from fastdiff.dispatch import auto_dtype
from fastdiff.pipelines.base import DEFAULT_STEPS

DEFAULT_MODEL = "digits-ddpm"
# sampler name → scheduler class in fastdiff.schedulers (and SAMPLER_OPTIONS: config values the name sets)
SAMPLERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-2m-sde": "DPMSolverMultistepScheduler",
    "dpm++-3m": "DPMSolverMultistepScheduler",
    "dpm++-3m-sde": "DPMSolverMultistepScheduler",
    "dpm++-1s": "DPMSolverSinglestepScheduler",
    "dpm++-2s": "DPMSolverSinglestepScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm++-sde": "DPMSolverSDEScheduler",  # needs torchsde (the sde extra)
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "heun": "HeunDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
}
SAMPLER_OPTIONS = {
    "dpm++": {"algorithm_type": "dpmsolver++", "solver_order": 2},  # DPM++ 2M
    "dpm++-2m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "dpm++-3m": {"algorithm_type": "dpmsolver++", "solver_order": 3},
    "dpm++-3m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "dpm++-1s": {"algorithm_type": "dpmsolver++", "solver_order": 1},  # singlestep
    "dpm++-2s": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "pndm": {"skip_prk_steps": True},  # PLMS steps only, as Stable Diffusion 1.x configures it
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what ``--dtype`` accepts; "auto" is resolved by :func:`resolve_dtype`


def model_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """The folder of a shipped model name, or ``name_or_path`` itself if it is a pipeline folder."""
    path = Path(name_or_path)
    if (path / "model_index.json").is_file():
        return path
    name = str(name_or_path)
    if name in list_models():
        return ASSETS / name
    raise ValueError(f"unknown model {name!r}: not a shipped model ({', '.join(list_models()) or 'none'}) "
                     f"nor a pipeline folder with model_index.json")


def model_settings(name_or_path: Union[str, os.PathLike]) -> dict:
    """The pipeline settings saved with a model (e.g. sample_size, default guidance and steps); an extension folder's
    (a ControlNet naming its ``base_model``) over its base model's, as it loads."""
    from fastdiff.pipelines.base import pipeline_settings

    return pipeline_settings(model_path(name_or_path))


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a torch.device: None → cuda if available, else cpu. ValueError for anything but an available
    cpu/cuda device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available here")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None],
                  device: Union[str, torch.device, None] = None) -> Optional[torch.dtype]:
    """None (the weights' own dtype), a torch floating dtype, a name of :data:`DTYPES` ("fp32", "fp16", "bf16") or
    "auto" (:func:`fastdiff.dispatch.auto_dtype`: bf16 on a CPU with native bf16, else None). ``device`` is where
    the model runs (None: the CPU, where weights load); on CUDA "auto" keeps the weights' dtype."""
    if dtype == "auto":
        return auto_dtype("cpu" if device is None else torch.device(device).type)
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"--dtype must be a name or a torch.dtype, got {type(dtype).__name__}")
    raise ValueError(f"--dtype must be one of {list(DTYPE_CHOICES)} (or float32/float16/bfloat16), got {dtype!r}")


def load(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, device: Union[str, torch.device, None] = None,
         dtype: Union[str, torch.dtype, None] = None, sampler: Optional[str] = None,
         allow_non_finite: bool = False):
    """The ready pipeline of a shipped model (see :func:`list_models`) or of a saved pipeline folder.

    ``sampler``: one of :data:`SAMPLERS` to replace the model's own scheduler (its configuration carried over);
    ``device``: "cpu", "cuda" or None (as the weights load: cpu); ``dtype``: None (the weights' own, fp32), a torch
    dtype, "fp32"/"fp16"/"bf16", or "auto" (bf16 on a CPU with native bf16, else the weights' own; what
    ``fastdiff sample`` uses by default); ``allow_non_finite``: load weights holding NaN/Inf (refused by default, a
    ValueError naming the tensor). A folder's weight files are checked against its ``checksums.json`` (every
    shipped model has one): a damaged install raises :class:`fastdiff.integrity.CorruptedModelError` naming the file.

    Example: ``fastdiff.load("digits-ddpm", sampler="dpm++")(batch_size=16, class_labels=[3] * 16,
    num_inference_steps=15, guidance_scale=3.0, output_type="np")``. Raises ValueError for an unknown name or
    sampler, or a sampler for a model without one (a GAN); TypeError for arguments of the wrong type.
    """
    from fastdiff import schedulers
    from fastdiff.pipelines import load_pipeline

    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    dev = None if device is None else resolve_device(device)
    path = model_path(name_or_path)
    pipe = load_pipeline(path, device=dev, dtype=resolve_dtype(dtype, dev), allow_non_finite=bool(allow_non_finite))
    if sampler is not None:
        if getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"--sampler: model {str(name_or_path)!r} has no diffusion sampler (it is a GAN)")
        pipe.scheduler = getattr(schedulers, SAMPLERS[sampler]).from_config(pipe.scheduler.config,
                                                                            **SAMPLER_OPTIONS.get(sampler, {}))
    return pipe


@dataclass(frozen=True)
class SamplingDefaults:
    """What a pipeline is called with when the caller does not say: ``num_classes`` (None: not class-conditional;
    else image i gets class i mod num_classes, passed as ``class_labels``: a text-to-image pipeline reads label d as
    the prompt "d"), ``steps`` (None for a GAN) and ``guidance`` (None: no guidance)."""

    num_classes: Optional[int]
    steps: Optional[int]
    guidance: Optional[float]

    def class_labels(self, indices) -> Optional[list[int]]:
        """The class of each image index (labels cycling 0 … num_classes − 1), or None when unconditional."""
        return None if self.num_classes is None else [int(i) % self.num_classes for i in indices]

    def call_kwargs(self) -> dict:
        """The step and guidance keyword arguments of the pipeline call (none for a GAN or without guidance)."""
        kwargs = {}
        if self.steps is not None:
            kwargs["num_inference_steps"] = self.steps
        if self.guidance is not None:
            kwargs["guidance_scale"] = self.guidance
        return kwargs


def sampling_defaults(pipe, steps: Optional[int] = None, guidance: Optional[float] = None,
                      model: Optional[str] = None) -> SamplingDefaults:
    """The steps, guidance and classes a call of ``pipe`` uses: the caller's ``steps`` / ``guidance`` where given,
    else the model's saved ``default_steps`` (else :data:`DEFAULT_STEPS`) and ``default_guidance_scale`` (for any
    conditional model: class labels or a cross-attention context).

    ``num_classes``: the UNet's ``config.num_classes``; else the pipeline's ``label_prompts`` (a text-to-image
    pipeline takes ``class_labels`` 0 … 9 as the prompts "0" … "9", so generic callers sample it as a 10-class
    model); else None.

    Raises ValueError naming the argument: steps for a GAN (one step) or more steps than the model was trained with,
    guidance for a model with neither classes nor a text context.
    """
    what = f"model {model!r}" if model else "this model"
    settings = getattr(pipe, "settings", {}) or {}
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    num_classes = getattr(config, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(pipe, "label_prompts", None)
    conditional = num_classes is not None or getattr(config, "context_dim", None) is not None
    if unet is None or getattr(pipe, "scheduler", None) is None:  # a GAN (or a VQ-VAE without a prior): one step
        if steps is not None:
            raise ValueError(f"--steps: {what} samples in one step (a GAN)")
        if guidance is not None:
            raise ValueError(f"--guidance: {what} is unconditional (a GAN)")
        return SamplingDefaults(None, None, None)
    if guidance is not None and not conditional:
        raise ValueError(f"--guidance: {what} is unconditional")
    if guidance is None and conditional:
        guidance = settings.get("default_guidance_scale")
    steps = steps if steps is not None else int(settings.get("default_steps", DEFAULT_STEPS))
    num_train = pipe.scheduler.config.num_train_timesteps
    if steps > num_train:
        raise ValueError(f"--steps must be ≤ {num_train} (the model's training steps), got {steps}")
    return SamplingDefaults(num_classes, steps, None if guidance is None else float(guidance))
