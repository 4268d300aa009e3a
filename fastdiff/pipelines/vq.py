"""VQ-VAE pipeline: decode code indices, or sample new codes.

Sampling uses a latent DDPM prior on the VQ-VAE's pre-quantisation latents z_e: the UNet denoises continuous
latents, the VectorQuantizer snaps them to the nearest codebook vectors (fastdiff.ops.vq_nearest, the native
search), and the decoder turns the codes into images.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastdiff.pipelines.base import OUTPUT_TYPES, to_output
from fastdiff.pipelines.diffusion import DiffusionPipeline


class VQPipeline(DiffusionPipeline):
    """``VQPipeline(vqvae, unet=None, scheduler=None, sample_size=code_grid_size)``.

    ``pipe.decode_indices(indices (B, h, w) int64, output_type)`` decodes codes; ``pipe(batch_size, ...)`` samples
    codes with the latent prior (needs ``unet`` and ``scheduler``) and decodes them. ``pipe.last_indices`` holds
    the codes of the last call.
    """

    component_names = ("vqvae", "unet", "scheduler")

    def __init__(self, vqvae, unet=None, scheduler=None, sample_size: Union[int, tuple[int, int], None] = None):
        self.vqvae = vqvae
        self.last_indices: Optional[Tensor] = None
        if unet is None or scheduler is None:
            super(DiffusionPipeline, self).__init__(vqvae=vqvae, unet=unet, scheduler=scheduler)
            self.settings = {"sample_size": sample_size}
            return
        super().__init__(unet, scheduler, sample_size)
        self.vqvae = vqvae

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        shape = super()._latent_shape(batch_size)
        if shape[1] != self.vqvae.config.code_dim:
            raise ValueError(f"the prior UNet makes {shape[1]} channels but the codebook vectors have "
                             f"{self.vqvae.config.code_dim}")
        return shape

    def _decode(self, latents: Tensor) -> Tensor:
        scaling = getattr(self.vqvae.config, "scaling_factor", 1.0)
        z_q, indices, _ = self.vqvae.quantize(latents / scaling)
        self.last_indices = indices
        return self.vqvae.decode(z_q)

    def __call__(self, *args, **kwargs):
        if self.unet is None or self.scheduler is None:
            raise ValueError("this VQPipeline has no prior (unet and scheduler); use decode_indices(indices)")
        return super().__call__(*args, **kwargs)

    @torch.inference_mode()
    def decode_indices(self, indices: Tensor, output_type: str = "pil"):
        """Code indices (B, h, w) → images (as ``output_type``)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
        k = self.vqvae.config.num_embeddings
        if indices.numel() and not indices.is_floating_point() and (indices.min() < 0 or indices.max() >= k):
            raise ValueError(f"indices must be in [0, {k})")
        return to_output(self.vqvae.decode_indices(indices.to(self.device)), output_type)
