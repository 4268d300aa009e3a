"""GAN generators and discriminators: the seed chapter's DCGAN, and StyleGAN (mapping network, style injection by
modulated convolution or AdaIN, per-layer noise, style mixing, truncation) with a residual critic."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff import ops
from fastdiff.nn import GroupNorm
from fastdiff.validation import check_choice, check_fraction, check_int, check_positive_int, check_real

__all__ = ["DCGANConfig", "DCGANGenerator", "DCGANDiscriminator", "StyleGeneratorConfig", "StyleGenerator",
           "StyleDiscriminatorConfig", "StyleDiscriminator", "MappingNetwork", "EqualLinear"]


# --------------------------------------------------------------------------------------------- DCGAN
@dataclass
class DCGANConfig:
    resolution: int = 64  # image size: 16, 32 or 64
    latent_dim: int = 100  # size of z (generator input)
    channels: int = 3  # image channels
    width: int = 64  # feature channels at the highest resolution (ngf / ndf); ×2 per halving
    norm: str = "batch"  # the discriminator's normalisation: "batch" (DCGAN), "layer" (a WGAN-GP critic) or "none"

    def __post_init__(self):
        normalize_config(self)  # plain Python ints (numpy integers are accepted and stored as int)
        if self.resolution not in (16, 32, 64):
            raise ValueError(f"resolution must be 16, 32 or 64 (a power of two), got {self.resolution!r}")
        for name in ("latent_dim", "channels", "width"):
            check_positive_int(name, getattr(self, name))
        check_choice("norm", self.norm, ("batch", "layer", "none"))

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


def _check_image(x, cfg) -> None:
    """A discriminator's input: (B, channels, resolution, resolution), else ValueError naming x."""
    expected = (cfg.channels, cfg.resolution, cfg.resolution)
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {shape}")


def _critic_norm(norm: str, channels: int) -> list[nn.Module]:
    if norm == "batch":
        return [nn.BatchNorm2d(channels)]
    if norm == "layer":  # per-sample layer norm over (C, H, W): GroupNorm with one group, a fastdiff op
        return [GroupNorm(1, channels)]
    return []


class DCGANDiscriminator(ModelMixin):
    """DCGAN discriminator: strided Conv + BatchNorm + LeakyReLU(0.2) down to 4×4, then a 4×4 conv to one logit.
    ``norm="layer"`` replaces batch norm by a per-sample layer norm (fused GroupNorm, one group) and ``"none"``
    drops it: a WGAN-GP critic, whose gradient penalty is per sample, must not mix the samples of a batch.

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
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=cfg.norm == "none"), *_critic_norm(cfg.norm, c * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.config)
        return self.main(x).reshape(x.shape[0], 1)  # (B, 1)


# --------------------------------------------------------------------------------------------- StyleGAN
STYLES = ("modulated", "adain")
ACTIVATIONS = ("lrelu", "silu")


@dataclass
class StyleGeneratorConfig:
    resolution: int = 32  # output size, a power of two in [4, 1024]
    latent_dim: int = 128  # size of z
    w_dim: int = 128  # size of the intermediate latent w
    mapping_layers: int = 8  # MLP depth of the mapping network (8, as in StyleGAN)
    mapping_lr_multiplier: float = 0.01  # the mapping network learns this much slower than the synthesis network
    base_channels: int = 32  # channels at the output resolution; ×2 per halving ...
    max_channels: int = 128  # ... up to this many
    channels: int = 3  # image channels
    w_avg_beta: float = 0.995  # w_avg ← lerp(mean(w), w_avg, beta) at every map() in training (mixing w2 too)
    style: str = "modulated"  # "modulated": modulated conv + demodulation (StyleGAN2); "adain": AdaIN (StyleGAN)
    activation: str = "lrelu"  # "lrelu" (LeakyReLU 0.2, ×√2 gain) or "silu" (fused into AdaIN's normalisation)

    def __post_init__(self):
        normalize_config(self)  # plain Python ints and floats (numpy scalars are accepted and stored as such)
        if self.resolution < 4 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in [4, 1024], got {self.resolution!r}")
        for name in ("latent_dim", "w_dim", "mapping_layers", "base_channels", "max_channels", "channels"):
            check_positive_int(name, getattr(self, name))
        check_real("mapping_lr_multiplier", self.mapping_lr_multiplier, positive=True)
        check_fraction("w_avg_beta", self.w_avg_beta)
        check_choice("style", self.style, STYLES)
        check_choice("activation", self.activation, ACTIVATIONS)

    def channels_at(self, res: int) -> int:
        return min(self.max_channels, self.base_channels * self.resolution // res)


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate of ProGAN/StyleGAN: the weight is stored as N(0, 1/lr_mul²) and
    scaled by lr_mul/√fan_in at run time (the bias by lr_mul), so Adam's steps are the same size for every layer and
    ``lr_multiplier`` slows this layer down (the mapping network's 0.01).

    forward(x (…, in_features)) → (…, out_features), then LeakyReLU(0.2)·√2 with ``activation=True``.
    """

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0, bias_init: float = 0.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier))
        self.weight_gain, self.lr_multiplier = lr_multiplier / math.sqrt(in_features), lr_multiplier
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_multiplier)
        return _lrelu(x) if self.activation else x


def _lrelu(x: Tensor) -> Tensor:
    """LeakyReLU(0.2)·√2: the gain keeps the activations' second moment (He gain)."""
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


_LRELU_GAIN = math.sqrt(2.0)


class MappingNetwork(nn.Module):
    """z (B, latent_dim) → w (B, w_dim): pixel norm of z (unit mean square), then ``depth`` equalised-lr linear
    layers with LeakyReLU, all learning ``lr_multiplier`` times slower than the synthesis network."""

    def __init__(self, latent_dim: int, w_dim: int, depth: int, lr_multiplier: float):
        super().__init__()
        self.layers = nn.Sequential(*[EqualLinear(latent_dim if i == 0 else w_dim, w_dim, lr_multiplier,
                                                  activation=True) for i in range(depth)])

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8))


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: scale input channels by a style s = affine(w), convolve, and (demodulate)
    rescale each output channel to unit expected norm. Weights use the equalised-learning-rate scale 1/√fan_in.

    forward(x (B, C_in, H, W), w (B, w_dim)) → (B, C_out, H', W') (H' = 2H with ``upsample``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles start at 1: a plain convolution
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


class AdaINConv2d(nn.Module):
    """AdaIN style injection (StyleGAN v1's operation): an equalised-lr 3×3 conv, then adaptive instance
    normalisation AdaIN(x, w) = (1 + y_s(w))·(x − μ(x))/σ(x) + y_b(w) per sample and channel, then the activation
    (StyleGAN v1 puts the activation before the normalisation; after it, the SiLU fuses into the normalisation).

    The normalisation is ``fastdiff.ops.group_norm_silu`` on the batch folded into the channels ((1, B·C, H, W), one
    group per channel, the styles as its affine): one fused kernel call, with the SiLU fused in when the generator's
    activation is "silu". forward(x (B, C_in, H, W), w (B, w_dim), noise_fn) → (B, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool, activation: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.style = EqualLinear(w_dim, 2 * out_channels)  # (y_s, y_b), both 0 at the start: plain normalisation
        nn.init.zeros_(self.style.weight)
        self.scale = 1.0 / math.sqrt(in_channels * 9)
        self.upsample, self.activation = upsample, activation

    def forward(self, x: Tensor, w: Tensor, add) -> Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = add(F.conv2d(x, self.weight * self.scale, padding=1))  # + noise, before the normalisation
        b, c, h, wd = x.shape
        y_s, y_b = self.style(w).chunk(2, dim=1)  # (B, C) each
        x = ops.group_norm_silu(x.reshape(1, b * c, h, wd), b * c, (1 + y_s).reshape(-1), y_b.reshape(-1),
                                activation="silu" if self.activation == "silu" else None).reshape(b, c, h, wd)
        return x if self.activation == "silu" else _lrelu(x)


class StyledLayer(nn.Module):
    """One synthesis layer: the style-injected 3×3 conv (modulated, or AdaIN), + learned-strength per-pixel noise,
    + bias, activation. forward(x, w (B, w_dim), noise (B, 1, H', W')) → (B, C_out, H', W').

    With AdaIN the noise enters before the normalisation and there is no separate bias: the instance norm would
    remove it, and the style's y_b is the bias."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool = False,
                 style: str = "modulated", activation: str = "lrelu"):
        super().__init__()
        if style == "adain":
            self.conv = AdaINConv2d(in_channels, out_channels, w_dim, upsample, activation)
        else:
            self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, demodulate=True, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(()))  # learned; 0 at the start (and 0 = no noise)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if style != "adain" else None
        self.style, self.activation = style, activation

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        def add_noise(h):  # noise (B, 1, H, W) broadcasts over channels
            return h + self.noise_strength * noise

        if self.style == "adain":
            return self.conv(x, w, add_noise)
        x = add_noise(self.conv(x, w)) + self.bias[:, None, None]
        return F.silu(x) if self.activation == "silu" else _lrelu(x)


class ToRGB(nn.Module):
    """Modulated 1×1 conv (no demodulation) to image channels, plus bias."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[:, None, None]


class StyleGenerator(ModelMixin):
    """StyleGAN generator (Karras et al. 2019/2020), the seed chapter's architecture at small scale.

    - **Mapping network** z → w: pixel norm, ``mapping_layers`` (8) equalised-lr linear layers with LeakyReLU that
      learn ``mapping_lr_multiplier`` (0.01) times slower. ``w_avg``, a buffer, tracks the mean w in training.
    - **Synthesis network** from a learned constant 4×4 input: one styled 3×3 layer at 4×4 and two per higher
      resolution (the first upsamples), each with per-pixel noise scaled by a learned strength; skip-connected ToRGB
      outputs summed across resolutions. Styles enter through modulated convolutions with demodulation
      (``style="modulated"``, StyleGAN2) or AdaIN (``style="adain"``, StyleGAN; its instance normalisation, and
      the SiLU with ``activation="silu"``, run as one fused ``fastdiff.ops.group_norm_silu`` call).
    - **w and w+**: every styled layer and ToRGB reads its own row of w+ (B, :attr:`num_ws`, w_dim): styled layer i
      reads row i, the ToRGB after layer i reads row i + 1. A single w is broadcast to every row.

    Methods: :meth:`map` (z → w, with truncation), :meth:`truncate`, :meth:`synthesis` (w or w+ → image),
    :meth:`mix_ws` / :meth:`mix` (style mixing), :meth:`mixed_ws` (random mixing for training), :meth:`make_noise`.

    forward(z (B, latent_dim), truncation_psi=1.0, noise=None) → (B, channels, resolution, resolution).
        truncation_psi ψ: w ← w_avg + ψ·(w − w_avg) (ψ = 1: untruncated, ψ = 0: the mean w for every z).
        noise: None draws fresh N(0, 1) noise (global RNG), or a list of :attr:`num_noise_layers` tensors shaped as
        :meth:`noise_shapes` says (B, 1, r, r) — e.g. from :meth:`make_noise` with a generator.
    """

    config_class = StyleGeneratorConfig

    def __init__(self, config: Optional[StyleGeneratorConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(StyleGeneratorConfig, config, overrides)
        self.mapping = MappingNetwork(cfg.latent_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_multiplier)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

        c4 = cfg.channels_at(4)
        kw = dict(style=cfg.style, activation=cfg.activation)
        self.const = nn.Parameter(torch.randn(1, c4, 4, 4))
        self.layers = nn.ModuleList([StyledLayer(c4, c4, cfg.w_dim, **kw)])
        self.to_rgbs = nn.ModuleList([ToRGB(c4, cfg.channels, cfg.w_dim)])
        self.resolutions = [4]
        res, c = 4, c4
        while res < cfg.resolution:
            res *= 2
            c_new = cfg.channels_at(res)
            self.layers.append(StyledLayer(c, c_new, cfg.w_dim, upsample=True, **kw))
            self.layers.append(StyledLayer(c_new, c_new, cfg.w_dim, **kw))
            self.to_rgbs.append(ToRGB(c_new, cfg.channels, cfg.w_dim))
            self.resolutions += [res, res]
            c = c_new

    # ------------------------------------------------------------------ shapes
    @property
    def num_noise_layers(self) -> int:
        return len(self.layers)

    @property
    def num_ws(self) -> int:
        """Rows of w+: one per styled layer, plus one for the last ToRGB (2·log2(resolution) − 2)."""
        return len(self.layers) + 1

    def noise_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        return [(batch, 1, r, r) for r in self.resolutions]

    def make_noise(self, batch: int, generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> list[Tensor]:
        """Per-layer noise maps N(0, 1), drawn with ``generator`` (for reproducible samples)."""
        device = device if device is not None else self.const.device
        return [torch.randn(s, generator=generator, device=device, dtype=self.const.dtype)
                for s in self.noise_shapes(batch)]

    # ------------------------------------------------------------------ latents
    def _check_z(self, z) -> Tensor:
        d = self.config.latent_dim
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != d:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {d}), got {shape}")
        return z

    def _check_w(self, name: str, w, plus: bool = True) -> Tensor:
        d, n = self.config.w_dim, self.num_ws
        ok = isinstance(w, Tensor) and ((w.ndim == 2 and w.shape[1] == d) or
                                        (plus and w.ndim == 3 and tuple(w.shape[1:]) == (n, d)))
        if not ok:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{name} must have shape (B, {d})" + (f" or (B, {n}, {d}) (w+)" if plus else "")
                             + f", got {shape}")
        return w

    def truncate(self, w: Tensor, truncation_psi: float = 1.0) -> Tensor:
        """The truncation trick: w_avg + ψ·(w − w_avg), for w (B, w_dim) or w+ (B, num_ws, w_dim)."""
        self._check_w("w", w)
        psi = check_real("truncation_psi", truncation_psi)
        return w if psi == 1.0 else self.w_avg.to(w.dtype).lerp(w, psi)

    def map(self, z: Tensor, truncation_psi: float = 1.0) -> Tensor:
        """z (B, latent_dim) → w (B, w_dim), truncated toward ``w_avg`` by ψ; in training mode ``w_avg`` is updated
        (before truncation) with decay ``w_avg_beta``."""
        check_real("truncation_psi", truncation_psi)
        w = self.mapping(self._check_z(z))
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.config.w_avg_beta))
        return self.truncate(w, truncation_psi)

    def broadcast(self, w: Tensor) -> Tensor:
        """w (B, w_dim) → w+ (B, num_ws, w_dim), the same w in every row (w+ passes through)."""
        w = self._check_w("w", w)
        return w if w.ndim == 3 else w[:, None, :].expand(-1, self.num_ws, -1)

    def mix_ws(self, w1: Tensor, w2: Tensor, crossover) -> Tensor:
        """Style mixing: w+ whose rows < ``crossover`` come from w1 (the coarse styles: 4×4, 8×8 …) and the rest
        from w2 (the fine styles). w1, w2: (B, w_dim) or w+; crossover: an int in [0, num_ws] or a (B,) integer
        tensor (one crossover per sample). crossover = num_ws is w1 alone, crossover = 0 is w2 alone."""
        a, b = self.broadcast(w1), self.broadcast(w2)
        if a.shape != b.shape:
            raise ValueError(f"w2 must have w1's shape {tuple(a.shape)}, got {tuple(b.shape)}")
        n = self.num_ws
        if isinstance(crossover, Tensor):
            if crossover.shape != (a.shape[0],) or crossover.is_floating_point() or crossover.dtype == torch.bool:
                raise ValueError(f"crossover must be an int or a ({a.shape[0]},) integer tensor, got "
                                 f"{crossover.dtype} {tuple(crossover.shape)}")
            if bool(((crossover < 0) | (crossover > n)).any()):
                raise ValueError(f"crossover must be in [0, {n}]")
            cut = crossover.to(a.device)[:, None, None]
        else:
            cut = check_int("crossover", crossover, 0, n)
        rows = torch.arange(n, device=a.device)[None, :, None]
        return torch.where(rows < cut, a, b)

    def mixed_ws(self, z: Tensor, mixing_prob: float = 0.9, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training-time style mixing regularisation: w+ from z, where each sample with probability ``mixing_prob``
        crosses over to the w of a second, fresh z at a random row in [1, num_ws − 1]. Draws with ``generator``."""
        self._check_z(z)
        prob = check_fraction("mixing_prob", mixing_prob)
        b, n = z.shape[0], self.num_ws
        w = self.map(z)
        if prob == 0.0:
            return self.broadcast(w)
        z2 = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        w2 = self.map(z2)
        cut = torch.randint(1, n, (b,), generator=generator, device=z.device)
        mix = torch.rand(b, generator=generator, device=z.device) < prob
        return self.mix_ws(w, w2, torch.where(mix, cut, torch.full_like(cut, n)))

    # ------------------------------------------------------------------ synthesis
    def synthesis(self, ws: Tensor, noise: Optional[Sequence[Tensor]] = None) -> Tensor:
        """w (B, w_dim) or w+ (B, num_ws, w_dim) → images (B, channels, resolution, resolution). ``noise`` as in
        :meth:`forward`; set every layer's ``noise_strength`` to 0 for images that depend on w alone."""
        ws = self.broadcast(ws)
        b = ws.shape[0]
        if noise is None:
            noise = self.make_noise(b, device=ws.device)
        else:
            shapes = self.noise_shapes(b)
            if (not isinstance(noise, (list, tuple)) or len(noise) != len(shapes)
                    or any(not isinstance(n, Tensor) or tuple(n.shape) != s for n, s in zip(noise, shapes))):
                got = [tuple(n.shape) if isinstance(n, Tensor) else type(n).__name__ for n in noise] \
                    if isinstance(noise, (list, tuple)) else type(noise).__name__
                raise ValueError(f"noise must be a list of {len(shapes)} tensors of shapes {shapes}, got {got}")
        x = self.layers[0](self.const.expand(b, -1, -1, -1), ws[:, 0], noise[0])  # (B, C4, 4, 4)
        rgb = self.to_rgbs[0](x, ws[:, 1])
        for i, to_rgb in enumerate(self.to_rgbs[1:]):
            j = 2 * i + 1
            x = self.layers[j](x, ws[:, j], noise[j])  # upsample ×2
            x = self.layers[j + 1](x, ws[:, j + 1], noise[j + 1])
            rgb = F.interpolate(rgb, scale_factor=2.0, mode="bilinear", align_corners=False) + to_rgb(x, ws[:, j + 2])
        return rgb

    def mix(self, w1: Tensor, w2: Tensor, crossover, noise: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Images of :meth:`mix_ws` (coarse styles from w1, fine from w2): ``synthesis(mix_ws(w1, w2, crossover))``."""
        return self.synthesis(self.mix_ws(w1, w2, crossover), noise)

    def forward(self, z: Tensor, truncation_psi: float = 1.0, noise: Optional[Sequence[Tensor]] = None) -> Tensor:
        return self.synthesis(self.map(z, truncation_psi), noise)


# --------------------------------------------------------------------------------------------- critic
@dataclass
class StyleDiscriminatorConfig:
    resolution: int = 32  # input size, a power of two in [8, 1024]
    channels: int = 3  # image channels
    base_channels: int = 32  # channels at the input resolution; ×2 per halving ...
    max_channels: int = 128  # ... up to this many
    mbstd_group: int = 4  # minibatch standard deviation over groups of this many samples (1: off)

    def __post_init__(self):
        normalize_config(self)
        if self.resolution < 8 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in [8, 1024], got {self.resolution!r}")
        for name in ("channels", "base_channels", "max_channels", "mbstd_group"):
            check_positive_int(name, getattr(self, name))

    def channels_at(self, res: int) -> int:
        return min(self.max_channels, self.base_channels * self.resolution // res)


class _EqualConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1.0 / math.sqrt(cin * k * k)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


class _CriticBlock(nn.Module):
    """conv3×3 → lrelu → conv3×3 → lrelu → avg-pool ×½, plus a 1×1 skip from the pooled input, summed /√2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2, self.skip = _EqualConv(cin, cin, 3), _EqualConv(cin, cout, 3), _EqualConv(cin, cout, 1,
                                                                                                          bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.avg_pool2d(_lrelu(self.conv2(_lrelu(self.conv1(x)))), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) * (1 / math.sqrt(2.0))


class StyleDiscriminator(ModelMixin):
    """StyleGAN2's residual discriminator, small: a 1×1 conv from the image, residual blocks halving the resolution
    down to 4×4, the minibatch standard deviation as one extra feature map, a 3×3 conv and two linear layers to one
    raw score. Equalised learning rate everywhere and no normalisation layer. The minibatch std is the one feature
    that reads other samples (of its group, as in ProGAN, which trained it with WGAN-GP); with ``mbstd_group=1`` a
    sample's score, and so its gradient penalty or R1 term, is its own alone.

    forward(x (B, channels, resolution, resolution)) → scores (B, 1), not squashed: a WGAN critic's score, or a
    logit for the non-saturating / hinge losses (``torch.sigmoid(scores)`` is the chapter's D(x)).
    """

    config_class = StyleDiscriminatorConfig

    def __init__(self, config: Optional[StyleDiscriminatorConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(StyleDiscriminatorConfig, config, overrides)
        res, c = cfg.resolution, cfg.channels_at(cfg.resolution)
        self.from_rgb = _EqualConv(cfg.channels, c, 1)
        blocks = []
        while res > 4:
            blocks.append(_CriticBlock(c, cfg.channels_at(res // 2)))
            res, c = res // 2, cfg.channels_at(res // 2)
        self.blocks = nn.ModuleList(blocks)
        self.conv = _EqualConv(c + 1, c, 3)
        self.fc = EqualLinear(c * 16, c, activation=True)
        self.out = EqualLinear(c, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.config)
        h = _lrelu(self.from_rgb(x))
        for block in self.blocks:
            h = block(h)
        h = torch.cat([h, self._minibatch_std(h)], dim=1)
        h = _lrelu(self.conv(h))
        return self.out(self.fc(h.flatten(1)))

    def _minibatch_std(self, h: Tensor) -> Tensor:
        """(B, C, 4, 4) → (B, 1, 4, 4): the std over each group of ``mbstd_group`` samples (the largest divisor of B
        up to it), averaged over channels and pixels, one value per group."""
        b = h.shape[0]
        g = max(d for d in range(1, min(self.config.mbstd_group, b) + 1) if b % d == 0)
        y = h.reshape(g, b // g, *h.shape[1:])  # sample i is in group i mod (B/g)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
        return y.repeat(g)[:, None, None, None].expand(b, 1, *h.shape[2:])
