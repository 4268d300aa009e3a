"""Tiny configs of every fastdiff model and matching inputs, shared by test_models.py and test_checkpoints.py.

Each case builds a model and inputs from the current RNG state; ``run(model, inputs)`` returns the floating
outputs as a tuple, so tests can compare, reduce to a loss, or check shapes uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fastdiff.nn as fnn
from fastdiff.models import (
    VAE,
    VQVAE,
    AutoencoderKL,
    DCGANDiscriminator,
    DCGANGenerator,
    StyleGenerator,
    UNet,
)

HAS_VQ = hasattr(fnn, "VectorQuantizer")
needs_vq = pytest.mark.skipif(not HAS_VQ, reason="fastdiff.nn.VectorQuantizer (issue 3) is not there yet")


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, int], tuple[tuple, dict]]  # (model, batch) → (args, kwargs)
    shapes: tuple  # expected output shapes for batch 2 (floating outputs, in order)
    fused: bool = False  # contains group_norm_silu / attention
    vq: bool = False


def _unet():
    return UNet(in_channels=3, out_channels=3, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8)


def _unet_inputs(model, b):
    return (torch.randn(b, 3, 8, 8), torch.tensor([3, 700])[:b]), {}


def _unet_cond():
    # class labels (3 classes + null) and cross-attention to a 5-token context; attention at both levels
    return UNet(in_channels=4, out_channels=4, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(0, 1), norm_num_groups=4, num_attention_heads=2, num_classes=3, context_dim=6)


def _unet_cond_inputs(model, b):
    return (torch.randn(b, 4, 8, 8), 250), {"class_labels": torch.tensor([0, 3])[:b], "context": torch.randn(b, 5, 6)}


def _akl():
    return AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def _image16(model, b):
    return (torch.randn(b, 3, 16, 16),), {}


def _vqvae():
    return VQVAE(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3, norm_num_groups=4,
                 num_embeddings=16)


def _vae():
    return VAE(input_dim=64, hidden_dim=32, latent_dim=4)


def _vae_inputs(model, b):
    return (torch.rand(b + 1, 1, 8, 8),), {"generator": torch.Generator().manual_seed(1)}


def _dcgan_g():
    return DCGANGenerator(resolution=16, latent_dim=16, channels=1, width=8)


def _dcgan_d():
    return DCGANDiscriminator(resolution=16, channels=1, width=8)


def _style():
    return StyleGenerator(resolution=16, latent_dim=16, w_dim=16, mapping_layers=2, base_channels=8, max_channels=16)


def _style_inputs(model, b):
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(b, 16),), {"noise": model.make_noise(b, generator=gen)}


CASES = {
    "unet": Case(_unet, _unet_inputs, ((2, 3, 8, 8),), fused=True),
    "unet_cond": Case(_unet_cond, _unet_cond_inputs, ((2, 4, 8, 8),), fused=True),
    "autoencoder_kl": Case(_akl, _image16, ((2, 3, 16, 16), (2, 4, 8, 8), (2, 4, 8, 8)), fused=True),
    "vqvae": Case(_vqvae, _image16, ((2, 3, 16, 16), ()), fused=True, vq=True),
    "vae": Case(_vae, _vae_inputs, ((3, 1, 8, 8), (3, 4), (3, 4))),
    "dcgan_generator": Case(_dcgan_g, lambda m, b: ((torch.randn(b, 16),), {}), ((2, 1, 16, 16),)),
    "dcgan_discriminator": Case(_dcgan_d, lambda m, b: ((torch.randn(b, 1, 16, 16),), {}), ((2, 1),)),
    "style_generator": Case(_style, _style_inputs, ((2, 3, 16, 16),)),
}


def case_params():
    """pytest params over CASES, the VQ-VAE skipped until fastdiff.nn.VectorQuantizer exists."""
    return [pytest.param(name, marks=needs_vq if case.vq else ()) for name, case in CASES.items()]


def run(model: torch.nn.Module, inputs: tuple[tuple, dict]) -> tuple[torch.Tensor, ...]:
    """Call the model; return its floating outputs as a tuple (indices and other integer outputs dropped)."""
    args, kwargs = inputs
    out = model(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(o for o in outs if o.is_floating_point())


def make_inputs(name: str, model: torch.nn.Module, seed: int = 0, batch: int = 2) -> tuple[tuple, dict]:
    """Inputs of case ``name`` drawn after ``torch.manual_seed(seed)`` (fresh generators too): equal on every call."""
    torch.manual_seed(seed)
    return CASES[name].inputs(model, batch)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build()


def save_tiny_pixel_pipeline(path, scheduler) -> None:
    """A tiny class-conditional pixel-diffusion pipeline folder at ``path`` (8×8 grayscale, self-attention at the
    second level, 4 steps, guidance 2), made from seed 0: the model of the ``fastdiff generate`` tests."""
    from fastdiff.pipelines import DiffusionPipeline

    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(1,), norm_num_groups=4, attention_head_dim=8, num_classes=10).eval()
    pipe = DiffusionPipeline(unet, scheduler, sample_size=8)
    pipe.settings.update(default_steps=4, default_guidance_scale=2.0)
    pipe.save_pretrained(path)


def tiny_text_pipeline(seed: int = 0):
    """A tiny random text-to-image pipeline (seeded): word tokenizer (max_length 8), a 1-layer text encoder
    (hidden 16), a cross-attention UNet on 2×8×8 latents (attention at both levels), a 16×16 AutoencoderKL and
    DDIM; default 4 steps, guidance 3."""
    from fastdiff.models import TextEncoder, WordTokenizer
    from fastdiff.pipelines import TextToImagePipeline
    from fastdiff.schedulers import DDIMScheduler

    torch.manual_seed(seed)
    tokenizer = WordTokenizer(max_length=8)
    text_encoder = TextEncoder(max_length=8, hidden_size=16, num_layers=1, num_heads=2, projection_dim=8).eval()
    unet = UNet(in_channels=2, out_channels=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                attention_levels=(0, 1), norm_num_groups=4, attention_head_dim=8, context_dim=16).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=2, norm_num_groups=4).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = TextToImagePipeline(unet, vae, scheduler, text_encoder, tokenizer, sample_size=8)
    pipe.settings.update(default_steps=4, default_guidance_scale=3.0)
    return pipe
