"""fastdiff's compact models, built only from fastdiff.ops / fastdiff.nn, with safetensors checkpoints.

UNet (DDPM / latent diffusion, class and cross-attention conditioning), ControlNet (a UNet's encoder reading a control
map, residuals into the UNet's skips), IPAdapter + ImageEncoder (image prompts, decoupled cross-attention), VAE (MLP),
AutoencoderKL, VQVAE,
DCGANGenerator / DCGANDiscriminator, StyleGenerator / StyleDiscriminator, DigitClassifier (scores generated digits),
TextEncoder + WordTokenizer (prompts of the digits); training losses
in :mod:`fastdiff.models.losses`;
``save_pretrained`` / ``from_pretrained`` / :func:`load_model` in :mod:`fastdiff.models.modeling`.
"""

from fastdiff.models import losses
from fastdiff.models.classifier import DigitClassifier, DigitClassifierConfig
from fastdiff.models.controlnet import ControlNet, ControlNetConfig
from fastdiff.models.gan import (
    DCGANConfig,
    DCGANDiscriminator,
    DCGANGenerator,
    StyleDiscriminator,
    StyleDiscriminatorConfig,
    StyleGenerator,
    StyleGeneratorConfig,
)
from fastdiff.models.ip_adapter import ImageEncoder, ImageEncoderConfig, IPAdapter, IPAdapterConfig
from fastdiff.models.modeling import ModelMixin, load_model, registered_models
from fastdiff.models.text_encoder import TextEncoder, TextEncoderConfig, WordTokenizer
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.models.vae import VAE, AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, VAEConfig
from fastdiff.models.vqvae import VQVAE, VQVAEConfig

__all__ = [
    "UNet",
    "UNetConfig",
    "ControlNet",
    "ControlNetConfig",
    "IPAdapter",
    "IPAdapterConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "VAE",
    "VAEConfig",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "VQVAE",
    "VQVAEConfig",
    "DCGANConfig",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "StyleGenerator",
    "StyleGeneratorConfig",
    "StyleDiscriminator",
    "StyleDiscriminatorConfig",
    "DigitClassifier",
    "DigitClassifierConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "WordTokenizer",
    "ModelMixin",
    "load_model",
    "registered_models",
    "losses",
]
