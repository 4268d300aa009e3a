"""fastdiff and diffusers: load diffusers checkpoints into fastdiff's fused models, convert back, and accelerate
diffusers models and pipelines in place.

* :func:`from_diffusers` — a diffusers UNet2DModel / UNet2DConditionModel / ControlNetModel / AutoencoderKL / VQModel
  (folder or object) → the fastdiff model with the same weights; :func:`pipeline_from_diffusers` (also
  ``fastdiff.pipeline_from_diffusers``) — a diffusers pipeline folder → a fastdiff pipeline.
* :func:`to_diffusers` — a fastdiff UNet / ControlNet / AutoencoderKL / VQVAE → the diffusers model, a pixel
  DiffusionPipeline → a diffusers DDIMPipeline / DDPMPipeline, a TextToImagePipeline → :class:`DiffusersTextComponents`
  (diffusers unet, vae and scheduler with fastdiff's text encoder and tokenizer); :func:`save_diffusers_folder` writes
  the latter as a pipeline folder that diffusers reads component by component and :func:`pipeline_from_diffusers`
  reads whole.
* :func:`accelerate` / :func:`restore` / :func:`accelerate_report` — fused GroupNorm+SiLU, fastdiff attention and the
  fused DDPM/DDIM step inside existing diffusers objects, undone exactly.

diffusers is optional (``pip install 'fastdiff[diffusers]'``): it is imported only inside these functions, and only
where a diffusers object is read or built; a diffusers folder loads without it.
"""

from __future__ import annotations

from fastdiff.interop.acceleration import FastdiffAttnProcessor, accelerate, accelerate_report, restore
from fastdiff.interop.diffusers_config import SUPPORTED_MODELS, convert_config
from fastdiff.interop.diffusers_models import from_diffusers, model_to_diffusers
from fastdiff.interop.diffusers_pipelines import (
    DiffusersTextComponents,
    NullClassLabels,
    pipeline_from_diffusers,
    pipeline_to_diffusers,
    save_diffusers_folder,
)


def to_diffusers(model_or_pipeline, *, sample_size=None):
    """The diffusers equivalent of a fastdiff object, with the same weights (copied).

    * UNet → diffusers UNet2DModel, or UNet2DConditionModel when it has a ``context_dim`` (``sample_size`` goes into
      its config); ControlNet (with a ``context_dim``) → ControlNetModel; AutoencoderKL → AutoencoderKL; VQVAE →
      VQModel.
    * DiffusionPipeline (pixel space) with a DDIM / DDPM scheduler → diffusers DDIMPipeline / DDPMPipeline with
      diffusers' scheduler of the same class and config. diffusers' pipelines pass no class labels: for a
      class-conditional UNet a :class:`NullClassLabels` forward pre-hook on the diffusers UNet passes fastdiff's null
      class, so it samples unconditionally (as the fastdiff pipeline does with ``class_labels=None``).
    * TextToImagePipeline → :class:`DiffusersTextComponents` (``unet``, ``vae``, ``scheduler`` as diffusers objects,
      ``text_encoder`` and ``tokenizer`` fastdiff's, copied; its docstring shows the sampling loop).

    Raises ImportError (naming the extra) without diffusers, ValueError for what diffusers cannot express, TypeError
    for other objects.
    """
    from fastdiff.pipelines import Pipeline

    if isinstance(model_or_pipeline, Pipeline):
        return pipeline_to_diffusers(model_or_pipeline)
    return model_to_diffusers(model_or_pipeline, sample_size=sample_size)


__all__ = [
    "SUPPORTED_MODELS",
    "DiffusersTextComponents",
    "FastdiffAttnProcessor",
    "NullClassLabels",
    "accelerate",
    "accelerate_report",
    "convert_config",
    "from_diffusers",
    "model_to_diffusers",
    "pipeline_from_diffusers",
    "pipeline_to_diffusers",
    "restore",
    "save_diffusers_folder",
    "to_diffusers",
]
