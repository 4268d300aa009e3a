"""Variational autoencoders: the seed chapter's MLP ``VAE`` and the convolutional ``AutoencoderKL`` of latent
diffusion (plus the ``Encoder`` / ``Decoder`` it shares with the VQ-VAE).

``AutoencoderKL`` follows diffusers' layout and names: ``encoder.conv_in``, ``encoder.down_blocks[i].resnets`` /
``.downsamplers``, ``encoder.mid_block.resnets`` / ``.attentions``, ``encoder.conv_norm_out``, ``encoder.conv_out``,
``quant_conv``, ``post_quant_conv``, ``decoder.conv_in``, ``decoder.mid_block``, ``decoder.up_blocks[i].resnets`` /
``.upsamplers``, ``decoder.conv_norm_out``, ``decoder.conv_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.blocks import DownBlock2D, MidBlock2D, SpatialSelfAttention, UpBlock2D
from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.nn import Conv2d, GroupNormSiLU
from fastdiff.validation import check_positive_int

__all__ = ["VAE", "VAEConfig", "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian", "Encoder", "Decoder"]


# --------------------------------------------------------------------------------------------- MLP VAE
@dataclass
class VAEConfig:
    input_dim: int = 784  # flattened input size (28×28 MNIST in the seed chapter)
    hidden_dim: int = 400  # width of the one hidden layer of encoder and decoder
    latent_dim: int = 20  # size of z

    def __post_init__(self):
        normalize_config(self)  # plain Python ints (numpy integers are accepted and stored as int)
        for name in ("input_dim", "hidden_dim", "latent_dim"):
            check_positive_int(name, getattr(self, name))


class VAE(ModelMixin):
    """The seed chapter's MLP VAE (Kingma & Welling 2014): x → (μ, log σ²) → z = μ + σ·ε → sigmoid decoder.

    encode(x (B, input_dim) or (B, *dims) with prod(dims) = input_dim) → (mu, log_var), each (B, latent_dim).
    decode(z (B, latent_dim)) → (B, input_dim) in (0, 1).
    forward(x, generator=None) → (recon shaped like x, mu, log_var).
    """

    config_class = VAEConfig

    def __init__(self, config: Optional[VAEConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(VAEConfig, config, overrides)
        self.fc1 = nn.Linear(cfg.input_dim, cfg.hidden_dim)
        self.fc_mu = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.fc_var = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.fc3 = nn.Linear(cfg.latent_dim, cfg.hidden_dim)
        self.fc4 = nn.Linear(cfg.hidden_dim, cfg.input_dim)

    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2 or math.prod(x.shape[1:]) != self.config.input_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.config.input_dim}) or (B, *dims) with "
                             f"prod(dims) = {self.config.input_dim}, got {shape}")
        return x.reshape(x.shape[0], -1)  # (B, input_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(self._flat(x)))
        return self.fc_mu(h), self.fc_var(h)

    @staticmethod
    def reparameterize(mu: Tensor, log_var: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """z = μ + exp(½·log σ²)·ε, ε ~ N(0, I): sampling that gradients flow through."""
        std = torch.exp(0.5 * log_var)
        eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return mu + eps * std

    def decode(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {shape}")
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var, generator)
        return self.decode(z).reshape(x.shape), mu, log_var


# --------------------------------------------------------------------------------------------- conv encoder/decoder
class Encoder(nn.Module):
    """conv_in → down blocks (stride-2 with right/bottom padding) → mid block (resnet, attention, resnet) →
    GroupNorm+SiLU → conv_out. (B, in_channels, H, W) → (B, out_channels, H/f, W/f), f = 2**(levels − 1)."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, eps: float, mid_attention: bool):
        super().__init__()
        ch = block_out_channels
        self.conv_in = Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(ch[max(i - 1, 0)], c, layers_per_block, None, groups, eps,
                        add_downsample=i < len(ch) - 1, downsample_padding=0)
            for i, c in enumerate(ch))
        self.mid_block = MidBlock2D(ch[-1], None, groups, eps, attention=_single_head(groups, eps, mid_attention))
        self.conv_norm_out = GroupNormSiLU(groups, ch[-1], eps)
        self.conv_out = Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_norm_out(h))


class Decoder(nn.Module):
    """conv_in → mid block → up blocks (layers_per_block + 1 resnets, nearest ×2 + conv) → GroupNorm+SiLU →
    conv_out. (B, in_channels, h, w) → (B, out_channels, h·f, w·f)."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, eps: float, mid_attention: bool):
        super().__init__()
        rev = tuple(reversed(block_out_channels))
        self.conv_in = Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock2D(rev[0], None, groups, eps, attention=_single_head(groups, eps, mid_attention))
        self.up_blocks = nn.ModuleList(
            UpBlock2D(rev[max(i - 1, 0)], c, layers_per_block + 1, None, groups, eps, add_upsample=i < len(rev) - 1)
            for i, c in enumerate(rev))
        self.conv_norm_out = GroupNormSiLU(groups, rev[-1], eps)
        self.conv_out = Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))


def _single_head(groups: int, eps: float, enabled: bool):
    """The autoencoders' mid-block attention: one head as wide as the channels."""
    return (lambda c: SpatialSelfAttention(c, 1, c, groups, eps)) if enabled else None


def check_autoencoder_config(cfg) -> None:
    """Shared validation of the conv autoencoder configs: every field stored as a plain Python value
    (:func:`normalize_config`), then TypeError / ValueError naming the field."""
    normalize_config(cfg)
    ch = cfg.block_out_channels
    if not ch or any(c <= 0 for c in ch):
        raise ValueError(f"block_out_channels must be positive ints, got {cfg.block_out_channels}")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        check_positive_int(name, getattr(cfg, name))
    if any(c % cfg.norm_num_groups for c in ch):
        raise ValueError(f"norm_num_groups={cfg.norm_num_groups} must divide every entry of block_out_channels {ch}")


def check_image(x: Tensor, channels: int, factor: int, what: str = "x") -> None:
    """(B, channels, H, W) with H, W multiples of ``factor``, else ValueError."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"{what} has size {x.shape[2]}×{x.shape[3]}; H and W must be multiples of {factor} "
                         f"(the encoder halves them {int(math.log2(factor))} times)")


# --------------------------------------------------------------------------------------------- AutoencoderKL
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's (B, 2·C, h, w) moments; logvar clamped to [−30, 20]."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample, (B,): ½·Σ(mean² + var − 1 − logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # reconstructed image channels
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple[int, ...] = (64, 128)  # channels per level; z is 2**(levels − 1) times smaller
    layers_per_block: int = 1  # residual blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32  # GroupNorm groups, dividing every level's channels
    norm_eps: float = 1e-6  # GroupNorm epsilon (diffusers' autoencoders use 1e-6)
    mid_attention: bool = True  # single-head self-attention in the encoder's and decoder's middle blocks
    use_quant_conv: bool = True  # 1×1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1×1 conv on z before the decoder
    scaling_factor: float = 0.18215  # latents for diffusion = (z − shift_factor) · scaling_factor (pipelines apply it)
    shift_factor: Optional[float] = None  # subtracted before scaling (None = 0)

    def __post_init__(self):
        check_autoencoder_config(self)


class AutoencoderKL(ModelMixin):
    """Convolutional VAE with a KL-regularised latent (latent diffusion's first stage).

    encode(x (B, in_channels, H, W)) → DiagonalGaussian over z (B, latent_channels, H/f, W/f), f = 2**(levels − 1).
    decode(z) → (B, out_channels, H, W).
    forward(x, sample_posterior=False, generator=None) → (recon, mean, logvar): z is the posterior mean unless
    ``sample_posterior`` (then drawn with ``generator``), so the output feeds :func:`fastdiff.models.losses.vae_loss`.
    ``scaling_factor`` / ``shift_factor`` are not applied here (as in diffusers): pipelines apply them.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: Optional[AutoencoderKLConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(AutoencoderKLConfig, config, overrides)
        ch, latent = tuple(cfg.block_out_channels), cfg.latent_channels
        args = (ch, cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_attention)
        self.encoder = Encoder(cfg.in_channels, 2 * latent, *args)
        self.decoder = Decoder(latent, cfg.out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        check_image(x, self.config.in_channels, self.downsample_factor)
        moments = self.encoder(x)  # (B, 2·latent, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        check_image(z, self.config.latent_channels, 1, what="z")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior.mean, posterior.logvar
