"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trainable copy of a UNet's encoder (input convolution, time/class embedding, down path, middle block) that reads a
control map (edges, a pose, a depth map) and returns one residual per skip connection of the UNet plus one for its
middle block, each through a zero-initialised 1×1 convolution, so a fresh ControlNet leaves the UNet unchanged.

Layout, parameter and config names follow diffusers' ``ControlNetModel``: ``conv_in``, ``time_embedding``,
``class_embedding``, ``controlnet_cond_embedding`` (``conv_in``, ``blocks``, ``conv_out``), ``down_blocks``,
``controlnet_down_blocks``, ``mid_block``, ``controlnet_mid_block``; ``conditioning_channels``,
``conditioning_embedding_out_channels``, ``global_pool_conditions``. A cross-attention ControlNet (``context_dim``)
converts to a diffusers ControlNetModel and back (:func:`fastdiff.to_diffusers`, :func:`fastdiff.from_diffusers`).

Use: ``down, mid = controlnet(x, t, control_map, context=c)`` then ``unet(x, t, context=c,
down_block_additional_residuals=down, mid_block_additional_residual=mid)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.modeling import build_config, normalize_config
from fastdiff.models.unet import Timesteps, UNet, UNetConfig, UNetEncoder, skip_layout
from fastdiff.nn import Conv2d
from fastdiff.validation import check_bool, check_positive_int, check_real

__all__ = ["ControlNet", "ControlNetConfig", "ControlNetConditioningEmbedding"]

# the UNetConfig fields that shape the copied encoder (the rest — out_channels, the up path's, guidance, dropout — do
# not reach a ControlNet)
UNET_FIELDS = ("in_channels", "base_channels", "channel_mult", "block_out_channels", "layers_per_block",
               "attention_levels", "mid_attention", "attention_head_dim", "num_attention_heads", "norm_num_groups",
               "norm_eps", "num_classes", "context_dim", "use_linear_projection", "flip_sin_to_cos", "freq_shift")


@dataclass
class ControlNetConfig:
    # --- the encoder, as the UNet it is built from (UNetConfig's meaning and defaults)
    in_channels: int = 3  # channels of x_t
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    block_out_channels: Optional[tuple[int, ...]] = None  # explicit channels per level (overrides the two above)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = (1,)
    mid_attention: bool = True
    attention_head_dim: Optional[int] = 8
    num_attention_heads: Optional[int] = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    num_classes: Optional[int] = None  # class-conditional: labels 0..num_classes-1, plus num_classes = "null"
    context_dim: Optional[int] = None  # cross-attention to a (B, M, context_dim) context
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    # --- the control map
    conditioning_channels: int = 1  # channels of the control map (1: a grayscale edge / digit map; 3 for RGB maps)
    # channels of the conditioning embedding's stages; the map is halved between stages, so it has
    # 2**(len − 1) times the UNet input's height and width: (16, 32) takes a 16×16 map to an 8×8 latent
    # (diffusers' default (16, 32, 96, 256): 8×, a 512² image to a 64² Stable Diffusion latent)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32)
    global_pool_conditions: bool = False  # average every residual over H×W (B, C, 1, 1); guess mode then does nothing

    def __post_init__(self):
        normalize_config(self)
        try:  # the encoder obeys the UNet's rules, checked (and worded) in one place
            UNetConfig(**self.unet_fields())
        except ValueError as exc:
            raise ValueError(f"invalid ControlNetConfig: {exc}") from None
        check_positive_int("conditioning_channels", self.conditioning_channels)
        stages = self.conditioning_embedding_out_channels
        if not stages:
            raise ValueError("conditioning_embedding_out_channels must hold at least one channel count, got ()")
        for i, c in enumerate(stages):
            check_positive_int(f"conditioning_embedding_out_channels[{i}]", c)

    channels = UNetConfig.channels  # channels per level (the same property: not a field)

    def unet_fields(self) -> dict:
        """The fields shared with UNetConfig, by name."""
        return {name: getattr(self, name) for name in UNET_FIELDS}

    @classmethod
    def from_unet_config(cls, unet_config: UNetConfig, **controlnet_fields) -> "ControlNetConfig":
        """The config of a ControlNet for a UNet of ``unet_config`` (its encoder fields) plus ``controlnet_fields``
        (conditioning_channels, conditioning_embedding_out_channels, global_pool_conditions)."""
        unknown = sorted(set(controlnet_fields) - ({f.name for f in dataclasses.fields(cls)} - set(UNET_FIELDS)))
        if unknown:
            raise ValueError(f"unknown ControlNet option(s) {unknown}; the UNet's config gives the encoder's")
        return cls(**{name: getattr(unet_config, name) for name in UNET_FIELDS}, **controlnet_fields)


class ControlNetConditioningEmbedding(nn.Module):
    """The control map → a feature map at the UNet input's resolution (diffusers' ControlNetConditioningEmbedding):
    conv_in (3×3) → SiLU → [3×3 conv → SiLU → 3×3 stride-2 conv → SiLU] per further stage → conv_out (3×3, zero-
    initialised, so it starts silent).

    forward((B, conditioning_channels, H·f, W·f)) → (B, out_channels, H, W), f = 2**(len(block_out_channels) − 1).
    """

    def __init__(self, out_channels: int, conditioning_channels: int, block_out_channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = _zero(Conv2d(block_out_channels[-1], out_channels, 3, padding=1))

    def forward(self, cond: Tensor) -> Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(UNetEncoder):
    """A UNet's encoder reading a control map: ``ControlNet(ControlNetConfig(...))``, ``ControlNet(**fields)`` or
    :meth:`from_unet` (the usual start: the UNet's encoder weights, silent zero convolutions).

    forward(x, t, controlnet_cond, conditioning_scale=1.0, class_labels=None, context=None, guess_mode=False):
        x, t, class_labels, context: as :class:`~fastdiff.models.UNet` takes them (the same x_t, timestep, labels
            and context the UNet gets).
        controlnet_cond: the control map (B, conditioning_channels, H·f, W·f) for x of (B, C, H, W), with
            f = :attr:`cond_factor` = 2**(len(conditioning_embedding_out_channels) − 1); floating, on x's device.
        conditioning_scale: a real number multiplying every residual (0 turns the control off).
        guess_mode: scale the residuals from 0.1 (the first skip state) up to 1.0 (the middle block), geometrically
            (``torch.logspace(-1, 0, n + 1)``, times conditioning_scale), as diffusers' guess mode; ignored with
            ``global_pool_conditions``.
    Returns (down_block_res_samples, mid_block_res_sample): a tuple with one tensor per skip state of the UNet, each
    of that state's shape (B, C, H/2**k, W/2**k), and (B, C_last, H/2**(levels−1), W/2**(levels−1)) — or all
    (B, C, 1, 1) with ``global_pool_conditions`` — for the UNet's ``down_block_additional_residuals`` and
    ``mid_block_additional_residual``.
    Raises what UNet.forward raises for x, t, class_labels and context; ValueError for a control map of the wrong
    shape or device; TypeError for a controlnet_cond that is not a floating tensor, a conditioning_scale that is not
    a real number, a guess_mode that is not a bool.
    """

    config_class = ControlNetConfig

    def __init__(self, config: Optional[ControlNetConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(ControlNetConfig, config, overrides)
        self._build_encoder(cfg)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.channels[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c, _ in skip_layout(cfg))
        self.controlnet_mid_block = _zero(nn.Conv2d(cfg.channels[-1], cfg.channels[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_channels: int = ControlNetConfig.conditioning_channels,
                  conditioning_embedding_out_channels: tuple[int, ...] = (
                      ControlNetConfig.conditioning_embedding_out_channels),
                  global_pool_conditions: bool = False, load_weights_from_unet: bool = True) -> "ControlNet":
        """A ControlNet for ``unet``: its encoder config, and (``load_weights_from_unet``) copies of its conv_in,
        time_embedding, class_embedding, down_blocks and mid_block weights; the conditioning embedding is freshly
        initialised and every zero convolution is zero, so its residuals start at exactly 0. On the UNet's device
        and dtype, in the UNet's train/eval mode (diffusers' ``ControlNetModel.from_unet``).

        The UNet's dropout is not carried (a ControlNet has none, as diffusers'), nor a guidance-distilled UNet's
        ``time_embedding.cond_proj``: the ControlNet's time embedding takes no guidance scale.
        Raises TypeError for a ``unet`` that is not a fastdiff UNet; ValueError / TypeError for bad options.
        """
        if not isinstance(unet, UNet):
            raise TypeError(f"unet must be a fastdiff UNet, got {type(unet).__name__}")
        check_bool("load_weights_from_unet", load_weights_from_unet)
        config = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=global_pool_conditions)
        param = next(unet.parameters())
        controlnet = cls(config).to(device=param.device, dtype=param.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "class_embedding", "down_blocks", "mid_block"):
                if getattr(unet, name) is not None:
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
            state = {k: v for k, v in unet.time_embedding.state_dict().items() if not k.startswith("cond_proj.")}
            controlnet.time_embedding.load_state_dict(state)
        return controlnet.train(unet.training)

    @property
    def cond_factor(self) -> int:
        """The control map is this many times the height and width of x."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def forward(self, x: Tensor, t: Timesteps, controlnet_cond: Tensor, conditioning_scale: float = 1.0,
                class_labels: Optional[Tensor] = None, context: Optional[Tensor] = None,
                guess_mode: bool = False) -> tuple[tuple[Tensor, ...], Tensor]:
        self._check_input(x)
        b = x.shape[0]
        t = self._timesteps(t, b, x.device)  # (B,)
        class_labels = self._class_labels(class_labels, b, x.device)  # (B,) or None
        self._check_context(context, b)
        self._check_cond(x, controlnet_cond)
        scale = check_real("conditioning_scale", conditioning_scale)
        guess_mode = check_bool("guess_mode", guess_mode)

        # 1. time (+ class) embedding, through SiLU; 2. x_t and the embedded control map, summed
        emb = self._embedding(t, class_labels)
        h = self.conv_in(x) + self.controlnet_cond_embedding(controlnet_cond.to(self.conv_in.weight.dtype))

        # 3. the UNet's down path and middle block, each state through its zero convolution
        h, skips = self._down(h, emb, context)
        h = self.mid_block(h, emb, context)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)

        # 4. scale: uniformly, or 0.1 → 1.0 geometrically from the first skip to the middle (guess mode)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale  # (n + 1,)
            down = [r * s for r, s in zip(down, scales)]
            mid = mid * scales[-1]
        elif scale != 1.0:
            down = [r * scale for r in down]
            mid = mid * scale
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]  # (B, C, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid

    def _check_cond(self, x: Tensor, cond: Tensor) -> None:
        c, f = self.config.conditioning_channels, self.cond_factor
        expected = (x.shape[0], c, x.shape[2] * f, x.shape[3] * f)
        if not isinstance(cond, Tensor) or not cond.is_floating_point():
            kind = f"a {cond.dtype} tensor" if isinstance(cond, Tensor) else type(cond).__name__
            raise TypeError(f"controlnet_cond must be a floating torch.Tensor of shape {expected}, got {kind}")
        if tuple(cond.shape) != expected:
            raise ValueError(f"controlnet_cond must have shape {expected} (B, conditioning_channels={c}, H·{f}, W·{f} "
                             f"for x of {tuple(x.shape)}: conditioning_embedding_out_channels has "
                             f"{len(self.config.conditioning_embedding_out_channels)} stages, halving "
                             f"{len(self.config.conditioning_embedding_out_channels) - 1} times), got "
                             f"{tuple(cond.shape)}")
        if cond.device != x.device:
            raise ValueError(f"controlnet_cond is on {cond.device} but x is on {x.device}")
