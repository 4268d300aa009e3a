"""GAN generators and discriminators: the seed chapter's DCGAN and a compact StyleGAN-style generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.validation import check_positive_int, check_real

__all__ = ["DCGANConfig", "DCGANGenerator", "DCGANDiscriminator", "StyleGeneratorConfig", "StyleGenerator"]


# --------------------------------------------------------------------------------------------- DCGAN
@dataclass
class DCGANConfig:
    resolution: int = 64  # image size: 16, 32 or 64
    latent_dim: int = 100  # size of z (generator input)
    channels: int = 3  # image channels
    width: int = 64  # feature channels at the highest resolution (ngf / ndf); ×2 per halving

    def __post_init__(self):
        normalize_config(self)  # plain Python ints (numpy integers are accepted and stored as int)
        if self.resolution not in (16, 32, 64):
            raise ValueError(f"resolution must be 16, 32 or 64 (a power of two), got {self.resolution!r}")
        for name in ("latent_dim", "channels", "width"):
            check_positive_int(name, getattr(self, name))

    @property
    def num_layers(self) -> int:
        """Stride-2 (de)convolutions between 4×4 and the image: log2(resolution) − 2."""
        return int(math.log2(self.resolution)) - 2


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN paper initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(ModelMixin):
    """DCGAN generator (Radford et al. 2016): z → 4×4 → … → resolution, ConvTranspose + BatchNorm + ReLU, Tanh out.

    forward(z (B, latent_dim) or (B, latent_dim, 1, 1)) → (B, channels, resolution, resolution) in (−1, 1).
    """

    config_class = DCGANConfig

    def __init__(self, config: Optional[DCGANConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(DCGANConfig, config, overrides)
        c = cfg.width * 2 ** (cfg.num_layers - 1)  # channels at 4×4 (512 for 64×64, width 64)
        layers = [nn.ConvTranspose2d(cfg.latent_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(cfg.num_layers - 1):  # 4×4 → resolution/2, halving the channels
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        d = self.config.latent_dim
        if not isinstance(z, Tensor) or not (
                (z.ndim == 2 and z.shape[1] == d) or (z.ndim == 4 and tuple(z.shape[1:]) == (d, 1, 1))):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {d}) or (B, {d}, 1, 1), got {shape}")
        return self.main(z.reshape(z.shape[0], d, 1, 1))


class DCGANDiscriminator(ModelMixin):
    """DCGAN discriminator: strided Conv + BatchNorm + LeakyReLU(0.2) down to 4×4, then a 4×4 conv to one logit.

    forward(x (B, channels, resolution, resolution)) → logits (B, 1). The seed chapter ends with a Sigmoid;
    here the losses (fastdiff.models.losses) take logits, which is the same maths and numerically safe:
    ``torch.sigmoid(logits)`` is the chapter's D(x).
    """

    config_class = DCGANConfig

    def __init__(self, config: Optional[DCGANConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(DCGANConfig, config, overrides)
        c = cfg.width
        layers = [nn.Conv2d(cfg.channels, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(cfg.num_layers - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.channels, cfg.resolution, cfg.resolution)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {shape}")
        return self.main(x).reshape(x.shape[0], 1)  # (B, 1)


# --------------------------------------------------------------------------------------------- StyleGAN-style
@dataclass
class StyleGeneratorConfig:
    resolution: int = 32  # output size, a power of two in [4, 1024]
    latent_dim: int = 128  # size of z
    w_dim: int = 128  # size of the intermediate latent w
    mapping_layers: int = 4  # MLP depth of the mapping network (StyleGAN uses 8)
    base_channels: int = 32  # channels at the output resolution; ×2 per halving ...
    max_channels: int = 128  # ... up to this many
    channels: int = 3  # image channels
    w_avg_beta: float = 0.995  # w_avg ← lerp(mean(w), w_avg, beta) at every training forward

    def __post_init__(self):
        normalize_config(self)  # plain Python ints and floats (numpy scalars are accepted and stored as such)
        if self.resolution < 4 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in [4, 1024], got {self.resolution!r}")
        for name in ("latent_dim", "w_dim", "mapping_layers", "base_channels", "max_channels", "channels"):
            check_positive_int(name, getattr(self, name))
        if not 0.0 <= self.w_avg_beta <= 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1], got {self.w_avg_beta}")

    def channels_at(self, res: int) -> int:
        return min(self.max_channels, self.base_channels * self.resolution // res)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: scale input channels by a style s = affine(w), convolve, and (demodulate)
    rescale each output channel to unit expected norm. Weights use the equalised-learning-rate scale 1/√fan_in.

    forward(x (B, C_in, H, W), w (B, w_dim)) → (B, C_out, H', W') (H' = 2H with ``upsample``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the layer starts as a plain convolution
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding, self.demodulate, self.upsample = kernel_size // 2, demodulate, upsample

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        s = self.affine(w)  # (B, C_in)
        weight = self.weight * self.scale  # (C_out, C_in, k, k)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.conv2d(x * s[:, :, None, None], weight, padding=self.padding)  # (B, C_out, H, W)
        if self.demodulate:
            # σ_j = sqrt(Σ_{i,k} (s_i · w_ijk)²) = sqrt(s² @ Σ_k w²ᵀ)
            d = torch.rsqrt(s.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)  # (B, C_out)
            x = x * d[:, :, None, None]
        return x


class StyledLayer(nn.Module):
    """Modulated 3×3 conv → + learned-scale per-pixel noise → + bias → LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, demodulate=True, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        x = self.conv(x, w) + self.noise_strength * noise  # noise (B, 1, H, W) broadcasts over channels
        return F.leaky_relu(x + self.bias[:, None, None], 0.2)


class ToRGB(nn.Module):
    """Modulated 1×1 conv (no demodulation) to image channels, plus bias."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[:, None, None]


class StyleGenerator(ModelMixin):
    """Compact StyleGAN2-style generator (Karras et al. 2019/2020).

    Mapping network z → w (pixel-norm, MLP with LeakyReLU); synthesis from a learned constant 4×4 input, with a
    modulated-and-demodulated 3×3 conv layer at 4×4 and two per higher resolution (the first upsamples), each with
    per-pixel noise scaled by a learned strength; skip-connected ToRGB outputs summed across resolutions.

    forward(z (B, latent_dim), truncation=1.0, noise=None) → (B, channels, resolution, resolution).
        truncation ψ: w ← w_avg + ψ·(w − w_avg) (ψ = 1 disables the trick); w_avg is a buffer tracked in training.
        noise: None draws fresh N(0, 1) noise (global RNG), or a list of :attr:`num_noise_layers` tensors shaped as
        :meth:`noise_shapes` says (B, 1, r, r) — e.g. from :meth:`make_noise` with a generator.
    """

    config_class = StyleGeneratorConfig

    def __init__(self, config: Optional[StyleGeneratorConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(StyleGeneratorConfig, config, overrides)
        mapping: list[nn.Module] = []
        for i in range(cfg.mapping_layers):
            mapping += [nn.Linear(cfg.latent_dim if i == 0 else cfg.w_dim, cfg.w_dim), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*mapping)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

        c4 = cfg.channels_at(4)
        self.const = nn.Parameter(torch.randn(1, c4, 4, 4))
        self.layers = nn.ModuleList([StyledLayer(c4, c4, cfg.w_dim)])
        self.to_rgbs = nn.ModuleList([ToRGB(c4, cfg.channels, cfg.w_dim)])
        self.resolutions = [4]
        res, c = 4, c4
        while res < cfg.resolution:
            res *= 2
            c_new = cfg.channels_at(res)
            self.layers.append(StyledLayer(c, c_new, cfg.w_dim, upsample=True))
            self.layers.append(StyledLayer(c_new, c_new, cfg.w_dim))
            self.to_rgbs.append(ToRGB(c_new, cfg.channels, cfg.w_dim))
            self.resolutions += [res, res]
            c = c_new

    @property
    def num_noise_layers(self) -> int:
        return len(self.layers)

    def noise_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        return [(batch, 1, r, r) for r in self.resolutions]

    def make_noise(self, batch: int, generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> list[Tensor]:
        """Per-layer noise maps N(0, 1), drawn with ``generator`` (for reproducible samples)."""
        device = device if device is not None else self.const.device
        return [torch.randn(s, generator=generator, device=device, dtype=self.const.dtype)
                for s in self.noise_shapes(batch)]

    def map(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) → w (B, w_dim), after normalising z to unit mean square (pixel norm)."""
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        return self.mapping(z)

    def forward(self, z: Tensor, truncation: float = 1.0, noise: Optional[Sequence[Tensor]] = None) -> Tensor:
        cfg = self.config
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != cfg.latent_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {cfg.latent_dim}), got {shape}")
        check_real("truncation", truncation)
        b = z.shape[0]
        if noise is None:
            noise = self.make_noise(b, device=z.device)
        else:
            shapes = self.noise_shapes(b)
            if len(noise) != len(shapes) or any(tuple(n.shape) != s for n, s in zip(noise, shapes)):
                got = [tuple(n.shape) for n in noise]
                raise ValueError(f"noise must be a list of {len(shapes)} tensors of shapes {shapes}, got {got}")

        # 1. mapping network, tracking the mean w for the truncation trick
        w = self.map(z)  # (B, w_dim)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, cfg.w_avg_beta))
        if truncation != 1.0:
            w = self.w_avg + truncation * (w - self.w_avg)

        # 2. synthesis: constant → styled layers, RGB skips summed across resolutions
        x = self.layers[0](self.const.expand(b, -1, -1, -1), w, noise[0])  # (B, C4, 4, 4)
        rgb = self.to_rgbs[0](x, w)
        for i, to_rgb in enumerate(self.to_rgbs[1:]):
            x = self.layers[2 * i + 1](x, w, noise[2 * i + 1])  # upsample ×2
            x = self.layers[2 * i + 2](x, w, noise[2 * i + 2])
            rgb = F.interpolate(rgb, scale_factor=2.0, mode="bilinear", align_corners=False) + to_rgb(x, w)
        return rgb
