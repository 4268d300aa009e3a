"""VQ-VAE (van den Oord et al. 2017): conv encoder → nearest-codebook quantisation → conv decoder.

Layout and names follow diffusers' VQModel: ``encoder``, ``quant_conv``, ``quantize`` (the codebook),
``post_quant_conv``, ``decoder``. The quantiser is :class:`fastdiff.nn.VectorQuantizer` (its nearest-codebook
search is ``fastdiff.ops.vq_nearest``, native where built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from fastdiff import nn as fnn
from fastdiff.models.modeling import ModelMixin, build_config
from fastdiff.models.vae import Decoder, Encoder, check_autoencoder_config, check_image
from fastdiff.validation import check_positive_int

__all__ = ["VQVAE", "VQVAEConfig"]


@dataclass
class VQVAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # reconstructed image channels
    latent_channels: int = 3  # encoder output / decoder input channels
    block_out_channels: tuple[int, ...] = (64, 128)  # channels per level; the code grid is 2**(levels − 1) smaller
    layers_per_block: int = 1  # residual blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32  # GroupNorm groups, dividing every level's channels
    norm_eps: float = 1e-6  # GroupNorm epsilon
    mid_attention: bool = True  # single-head self-attention in the middle blocks
    num_embeddings: int = 256  # codebook size K
    embedding_dim: Optional[int] = None  # codebook vector size D (None: latent_channels)
    beta: float = 0.25  # commitment loss weight
    ema: bool = False  # codebook updated by exponential moving averages instead of gradients
    decay: float = 0.99  # EMA decay
    scaling_factor: float = 1.0  # scale applied by latent pipelines (stored for them; not used here)

    def __post_init__(self):
        check_autoencoder_config(self)  # also stores every field as a plain Python value
        check_positive_int("num_embeddings", self.num_embeddings)
        if self.embedding_dim is not None:
            check_positive_int("embedding_dim", self.embedding_dim)

    @property
    def code_dim(self) -> int:
        return self.embedding_dim or self.latent_channels


class VQVAE(ModelMixin):
    """Discrete autoencoder.

    encode(x (B, in_channels, H, W)) → code indices (B, H/f, W/f) int64, f = 2**(levels − 1).
    decode_indices(indices (B, h, w)) → (B, out_channels, h·f, w·f).
    encode_latents(x) → z_e (B, code_dim, h, w) before quantisation; decode(z_q) decodes quantised latents.
    forward(x) → (recon, indices, vq_loss): vq_loss is the quantiser's codebook + β·commitment loss (scalar).
    """

    config_class = VQVAEConfig

    def __init__(self, config: Optional[VQVAEConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(VQVAEConfig, config, overrides)
        ch, latent, dim = tuple(cfg.block_out_channels), cfg.latent_channels, cfg.code_dim
        args = (ch, cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_attention)
        self.encoder = Encoder(cfg.in_channels, latent, *args)
        self.quant_conv = nn.Conv2d(latent, dim, 1)
        # looked up here, not imported at module level: fastdiff.nn.VectorQuantizer arrives with issue 3
        quantizer = getattr(fnn, "VectorQuantizer", None)
        if quantizer is None:
            raise ImportError("VQVAE needs fastdiff.nn.VectorQuantizer (issue 3), which this fastdiff does not have")
        self.quantize = quantizer(cfg.num_embeddings, dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay)
        self.post_quant_conv = nn.Conv2d(dim, latent, 1)
        self.decoder = Decoder(latent, cfg.out_channels, *args)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode_latents(self, x: Tensor) -> Tensor:
        check_image(x, self.config.in_channels, self.downsample_factor)
        return self.quant_conv(self.encoder(x))  # (B, D, h, w)

    def encode(self, x: Tensor) -> Tensor:
        _, indices, _ = self.quantize(self.encode_latents(x))
        return indices  # (B, h, w)

    def decode(self, z_q: Tensor) -> Tensor:
        check_image(z_q, self.config.code_dim, 1, what="z_q")
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor) or indices.ndim != 3 or indices.dtype.is_floating_point:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be an integer tensor of shape (B, h, w), got {shape}")
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_q, indices, vq_loss = self.quantize(self.encode_latents(x))
        return self.decode(z_q), indices, vq_loss
