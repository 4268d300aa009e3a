"""Sampling pipelines: pixel and latent diffusion (with classifier-free guidance), VQ-VAE decoding/sampling, GANs."""

from fastdiff.pipelines.base import NonFiniteError, Pipeline, load_pipeline, save_grid, to_output
from fastdiff.pipelines.diffusion import DiffusionPipeline, LatentDiffusionPipeline
from fastdiff.pipelines.gan import GANPipeline
from fastdiff.pipelines.vq import VQPipeline


def from_diffusers(path, **kwargs):
    """A fastdiff pipeline from a diffusers pipeline folder: see :func:`fastdiff.interop.pipeline_from_diffusers`."""
    from fastdiff.interop import pipeline_from_diffusers  # interop sits above pipelines: imported on use

    return pipeline_from_diffusers(path, **kwargs)


__all__ = ["Pipeline", "DiffusionPipeline", "LatentDiffusionPipeline", "VQPipeline", "GANPipeline",
           "NonFiniteError", "load_pipeline", "save_grid", "to_output", "from_diffusers"]
