"""Sampling pipelines: pixel and latent diffusion (with classifier-free guidance), text-to-image, VQ-VAE
decoding/sampling, GANs."""

from fastdiff.pipelines.base import NonFiniteError, Pipeline, load_pipeline, save_extension, save_grid, to_output
from fastdiff.pipelines.diffusion import DiffusionPipeline, LatentDiffusionPipeline
from fastdiff.pipelines.gan import GANPipeline
from fastdiff.pipelines.text import TextToImagePipeline
from fastdiff.pipelines.vq import VQPipeline

# A diffusers pipeline folder loads with fastdiff.pipeline_from_diffusers (fastdiff.interop sits above this package).


__all__ = ["Pipeline", "DiffusionPipeline", "LatentDiffusionPipeline", "TextToImagePipeline", "VQPipeline",
           "GANPipeline",
           "NonFiniteError", "load_pipeline", "save_extension", "save_grid", "to_output"]
