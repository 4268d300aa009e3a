"""The diffusion UNet (DDPM / latent diffusion): residual blocks with a time embedding, self-attention at chosen
levels, optional class conditioning (with a "null" class for classifier-free guidance) and optional
cross-attention to a context sequence.

Layout and parameter names follow diffusers: ``conv_in``, ``time_embedding.linear_1/linear_2``,
``class_embedding``, ``down_blocks[i].resnets/attentions/downsamplers``, ``mid_block``,
``up_blocks[i].resnets/attentions/upsamplers``, ``conv_norm_out``, ``conv_out``. Without ``context_dim`` the
attention layers are spatial self-attention (UNet2DModel's AttnDownBlock2D); with it they are transformer blocks
with self-attention, cross-attention and a feed-forward (UNet2DConditionModel's CrossAttnDownBlock2D).

:class:`UNetEncoder` holds the half a ControlNet copies (input convolution, embeddings, down path, middle block);
``UNet.forward`` takes a ControlNet's residuals as ``down_block_additional_residuals`` /
``mid_block_additional_residual`` (diffusers' names).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastdiff.models.blocks import (
    AttentionFactory,
    DownBlock2D,
    MidBlock2D,
    SpatialSelfAttention,
    TimestepEmbedding,
    Transformer2D,
    UpBlock2D,
    attention_heads,
    guidance_embedding,
    timestep_embedding,
)
from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.nn import Conv2d, GroupNormSiLU
from fastdiff.validation import check_positive_int

__all__ = ["UNet", "UNetConfig", "UNetEncoder", "attention_factory", "skip_layout"]

Timesteps = Union[int, float, Tensor]


@dataclass
class UNetConfig:
    in_channels: int = 3  # channels of x_t (3 for RGB pixels, 4 for SD latents)
    out_channels: int = 3  # channels of the prediction (ε, v or x0)
    base_channels: int = 64  # channels at level 0; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per level; the image is halved between levels
    block_out_channels: Optional[tuple[int, ...]] = None  # explicit channels per level (overrides the two above)
    layers_per_block: int = 2  # residual blocks per down level (up levels have one more, as in diffusers)
    attention_levels: tuple[int, ...] = (1,)  # levels with attention after every residual block; level i is H/2**i
    mid_attention: bool = True  # attention between the two residual blocks of the middle block
    attention_head_dim: Optional[int] = 8  # channels per head (heads = C // attention_head_dim)
    num_attention_heads: Optional[int] = None  # if set, a fixed head count per block (head dim = C // heads); wins
    norm_num_groups: int = 32  # GroupNorm groups, dividing every level's channels
    norm_eps: float = 1e-5  # GroupNorm epsilon of the residual blocks and self-attention
    num_classes: Optional[int] = None  # class-conditional: labels 0..num_classes-1, plus num_classes = "null"
    context_dim: Optional[int] = None  # cross-attention to a (B, M, context_dim) context (latent diffusion)
    use_linear_projection: bool = False  # transformer proj_in/proj_out as Linear instead of 1×1 conv (SD 2.x)
    dropout: float = 0.0  # dropout inside residual blocks and feed-forwards
    flip_sin_to_cos: bool = True  # time embedding order [cos, sin] (diffusers' default) or [sin, cos]
    freq_shift: float = 0.0  # diffusers' downscale_freq_shift of the sinusoidal embedding
    # guidance-distilled (LCM): forward takes the guidance scale w, embedded by blocks.guidance_embedding at this
    # width (≥ 4) and projected onto the time embedding's input (time_embedding.cond_proj); None: no such input
    guidance_embedding_dim: Optional[int] = None

    def __post_init__(self):
        normalize_config(self)  # tuples of plain Python ints, floats, bools (numpy scalars are accepted)
        channels = self.channels
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"channels per level must be positive ints, got {channels}")
        check_positive_int("in_channels", self.in_channels)
        check_positive_int("out_channels", self.out_channels)
        check_positive_int("layers_per_block", self.layers_per_block)
        check_positive_int("norm_num_groups", self.norm_num_groups)
        if self.attention_head_dim is not None:
            check_positive_int("attention_head_dim", self.attention_head_dim)
        if self.num_attention_heads is not None:
            check_positive_int("num_attention_heads", self.num_attention_heads)
        for c in channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every level's channels "
                                 f"{channels}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(channels)]
        if bad:
            raise ValueError(f"attention_levels must be level indices in [0, {len(channels)}), got {bad}")
        for c in channels:
            if self.num_attention_heads is None and self.attention_head_dim is not None and c % self.attention_head_dim:
                raise ValueError(f"attention_head_dim={self.attention_head_dim} must divide every level's channels "
                                 f"{channels}")
            if self.num_attention_heads is not None and c % self.num_attention_heads:
                raise ValueError(f"num_attention_heads={self.num_attention_heads} must divide every level's channels "
                                 f"{channels}")
        if self.num_classes is not None:
            check_positive_int("num_classes", self.num_classes)
        if self.context_dim is not None:
            check_positive_int("context_dim", self.context_dim)
        if self.guidance_embedding_dim is not None:
            check_positive_int("guidance_embedding_dim", self.guidance_embedding_dim)
            if self.guidance_embedding_dim < 4:  # the embedding's frequencies divide by dim/2 − 1
                raise ValueError(f"guidance_embedding_dim must be ≥ 4 (or None), got {self.guidance_embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels per level."""
        if self.block_out_channels is not None:
            return tuple(self.block_out_channels)
        return tuple(self.base_channels * m for m in self.channel_mult)


def attention_factory(cfg, dropout: float = 0.0) -> AttentionFactory:
    """The attention layer a UNet (or ControlNet) config puts at a level of ``c`` channels: a transformer block with
    cross-attention (and ``dropout`` in its feed-forward) when ``cfg.context_dim`` is set, spatial self-attention
    otherwise."""
    def make_attention(c: int) -> nn.Module:
        heads, dim_head = attention_heads(c, cfg.attention_head_dim, cfg.num_attention_heads)
        if cfg.context_dim is not None:
            return Transformer2D(c, heads, dim_head, cfg.context_dim, cfg.norm_num_groups, cfg.use_linear_projection,
                                 dropout)
        return SpatialSelfAttention(c, heads, dim_head, cfg.norm_num_groups, cfg.norm_eps)

    return make_attention


def skip_layout(cfg) -> list[tuple[int, int]]:
    """(channels, k) of every skip state of the down path, in push order: the state is (B, channels, H/2**k, W/2**k)
    for an input of H×W (conv_in's output, then each residual block's and each downsample's)."""
    channels = cfg.channels
    layout = [(channels[0], 0)]
    for level, c in enumerate(channels):
        layout += [(c, level)] * cfg.layers_per_block
        if level < len(channels) - 1:
            layout.append((c, level + 1))
    return layout


class UNetEncoder(ModelMixin):
    """What UNet and ControlNet share: ``conv_in``, ``time_embedding``, ``class_embedding``, ``down_blocks`` and
    ``mid_block`` (built by :meth:`_build_encoder`), the time (+ class) embedding, the down path, and the input
    checks. Not a model of its own (no ``config_class``: not registered)."""

    def _build_encoder(self, cfg, guidance_dim: Optional[int] = None, dropout: float = 0.0) -> None:
        channels = cfg.channels
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        temb = 4 * channels[0]
        make_attention = attention_factory(cfg, dropout)
        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, guidance_dim)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes is not None else None
        self.down_blocks = nn.ModuleList()
        for level, c in enumerate(channels):
            last = level == len(channels) - 1
            self.down_blocks.append(DownBlock2D(
                channels[max(level - 1, 0)], c, cfg.layers_per_block, temb, groups, eps, add_downsample=not last,
                attention=make_attention if level in cfg.attention_levels else None, dropout=dropout))
        self.mid_block = MidBlock2D(channels[-1], temb, groups, eps,
                                    attention=make_attention if cfg.mid_attention else None, dropout=dropout)

    @property
    def null_class(self) -> Optional[int]:
        """The label of the unconditional ("null") class for classifier-free guidance, or None."""
        return self.config.num_classes

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (len(self.config.channels) - 1)

    def _embedding(self, t: Tensor, class_labels: Optional[Tensor], w: Optional[Tensor] = None) -> Tensor:
        """SiLU(time (+ guidance) (+ class) embedding) (B, E): every residual block starts with SiLU(emb), done once
        here. ``t`` (B,), ``class_labels`` (B,) or None, ``w`` (B,) or None (checked already)."""
        dtype = self.conv_in.weight.dtype
        t_emb = timestep_embedding(t, self.config.channels[0], self.config.flip_sin_to_cos, self.config.freq_shift)
        w_emb = None if w is None else guidance_embedding(w, self.config.guidance_embedding_dim).to(dtype)  # (B, G)
        emb = self.time_embedding(t_emb.to(dtype), w_emb)  # (B, E)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        return torch.nn.functional.silu(emb)

    def _down(self, h: Tensor, emb: Tensor, context: Optional[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The down path from conv_in's output ``h``, keeping every intermediate state for the skip connections
        (in :func:`skip_layout` order); returns (lowest-resolution state, skips)."""
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, emb, context)
            skips.extend(states)
        return h, skips

    # ----------------------------------------------------------------------------------------- input checks
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the {type(self).__name__} expects in_channels="
                             f"{self.config.in_channels}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}×{x.shape[3]} cannot be halved {len(self.config.channels) - 1} "
                             f"times by the {type(self).__name__}'s levels: H and W must be multiples of {f}")

    @staticmethod
    def _timesteps(t: Timesteps, batch: int, device: torch.device, name: str = "t") -> Tensor:
        """A per-sample (B,) tensor from a number, a 0-d, (1,) or (B,) tensor; errors name the argument."""
        if isinstance(t, Tensor):
            if t.ndim == 0:
                return t.to(device).expand(batch)
            if t.shape == (batch,):
                return t.to(device)
            if t.shape == (1,):
                return t.to(device).expand(batch)
            raise ValueError(f"{name} must be a number, a 0-d tensor or a ({batch},) tensor, got shape "
                             f"{tuple(t.shape)}")
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
        return torch.full((batch,), float(t), device=device)

    def _class_labels(self, labels: Optional[Tensor], batch: int, device: torch.device) -> Optional[Tensor]:
        n = self.config.num_classes
        if n is None:
            if labels is not None:
                raise ValueError(f"class_labels were given to an unconditional {type(self).__name__} "
                                 f"(config.num_classes is None)")
            return None
        if labels is None:
            return torch.full((batch,), n, dtype=torch.long, device=device)  # the null class
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor of shape ({batch},)")
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(labels.shape)}")
        # a value check on the host: CPU tensors only (no device sync), and not while torch.compile traces (a
        # data-dependent branch would break the graph; fullgraph=True would fail on it)
        host_check = labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if host_check and bool(((labels < 0) | (labels > n)).any()):
            raise ValueError(f"class_labels must be in [0, {n}] ({n} is the null class), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels.to(device)

    def _check_context(self, context: Optional[Tensor], batch: int) -> None:
        dim = self.config.context_dim
        if dim is None:
            if context is not None:
                raise ValueError(f"context was given to a {type(self).__name__} without cross-attention "
                                 f"(config.context_dim is None)")
            return
        if context is None:
            raise ValueError(f"this {type(self).__name__} cross-attends to a context: pass context of shape "
                             f"({batch}, M, {dim})")
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[0] != batch or context.shape[2] != dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape ({batch}, M, {dim}), got {shape}")


class UNet(UNetEncoder):
    """ε/v/x0-prediction UNet. ``UNet(UNetConfig(...))`` or ``UNet(**config_fields)``.

    forward(x, t, class_labels=None, context=None, guidance=None, down_block_additional_residuals=None,
            mid_block_additional_residual=None):
        x: (B, in_channels, H, W), H and W divisible by 2**(levels − 1); fp32/fp16/bf16, any memory format.
        t: timestep(s): a number, a 0-d tensor or a (B,) tensor.
        class_labels: (B,) integer labels in [0, num_classes] (num_classes is the null class); None means the null
            class for a class-conditional UNet. Only for a UNet with ``num_classes``.
        context: (B, M, context_dim); required when the UNet has ``context_dim``.
        guidance: the guidance scale w the UNet was distilled to follow (a number, a 0-d tensor or a (B,) float
            tensor; 1 = the conditional model alone); required when the UNet has ``guidance_embedding_dim``, refused
            otherwise. It enters as blocks.guidance_embedding(w) through time_embedding.cond_proj.
        down_block_additional_residuals: a ControlNet's residuals (diffusers' name): one floating tensor per skip
            state of the down path (conv_in's output, every residual block's and every downsample's, in that order:
            ``1 + levels·layers_per_block + levels − 1`` of them), each of that state's shape (B, C, H/2**k, W/2**k)
            or (B, C, 1, 1) (a globally pooled ControlNet's), added to the state where the up path reads it.
        mid_block_additional_residual: (B, C_last, H/2**(levels−1), W/2**(levels−1)) or (B, C_last, 1, 1), added
            to the middle block's output. Either residual argument may be given without the other.
    Returns (B, out_channels, H, W).
    Raises ValueError for wrong shapes or channel counts, sizes the levels cannot halve, labels for an
    unconditional UNet or out of range (checked for CPU tensors only: no device sync), a missing or unexpected
    context, a missing or unexpected guidance, residuals of the wrong count, shape or device; TypeError for t or
    guidance neither a number nor a tensor, residuals that are not (sequences of) floating tensors.
    """

    config_class = UNetConfig

    def __init__(self, config: Optional[UNetConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(UNetConfig, config, overrides)
        self._build_encoder(cfg, cfg.guidance_embedding_dim, cfg.dropout)
        channels = cfg.channels
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        temb = 4 * channels[0]
        make_attention = attention_factory(cfg, cfg.dropout)

        skip_channels = [c for c, _ in skip_layout(cfg)]  # consumed from the end by the up path
        self.up_blocks = nn.ModuleList()
        prev = channels[-1]
        for level in reversed(range(len(channels))):
            c, n = channels[level], cfg.layers_per_block + 1
            skips = [skip_channels.pop() for _ in range(n)]
            self.up_blocks.append(UpBlock2D(
                prev, c, n, temb, groups, eps, add_upsample=level > 0, skip_channels=skips,
                attention=make_attention if level in cfg.attention_levels else None, dropout=cfg.dropout))
            prev = c

        self.conv_norm_out = GroupNormSiLU(groups, channels[0], eps)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Timesteps, class_labels: Optional[Tensor] = None,
                context: Optional[Tensor] = None, guidance: Optional[Timesteps] = None,
                down_block_additional_residuals: Optional[Sequence[Tensor]] = None,
                mid_block_additional_residual: Optional[Tensor] = None) -> Tensor:
        self._check_input(x)
        b = x.shape[0]
        t = self._timesteps(t, b, x.device)  # (B,)
        class_labels = self._class_labels(class_labels, b, x.device)  # (B,) or None
        self._check_context(context, b)
        w = self._guidance(guidance, b, x.device)  # (B,) or None
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            self._check_residuals(x, down_block_additional_residuals, mid_block_additional_residual)

        # 1. time (+ guidance) (+ class) embedding, through SiLU
        emb = self._embedding(t, class_labels, w)

        # 2. down path, keeping every intermediate state for the skip connections (+ a ControlNet's residuals)
        h, skips = self._down(self.conv_in(x), emb, context)
        if down_block_additional_residuals is not None:
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]

        # 3. middle (+ a ControlNet's residual), then the up path consumes the skips from the end
        h = self.mid_block(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.to(h.dtype)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)
        return self.conv_out(self.conv_norm_out(h))

    def _check_residuals(self, x: Tensor, down: Optional[Sequence[Tensor]], mid: Optional[Tensor]) -> None:
        """A ControlNet's residuals: one per skip state, each of its state's shape (or (B, C, 1, 1)), floating, on
        x's device; errors name the argument (and the index)."""
        b, _, height, width = x.shape
        layout = skip_layout(self.config)  # (channels, k) per skip state
        items = []
        if down is not None:
            if not isinstance(down, (list, tuple)):
                raise TypeError(f"down_block_additional_residuals must be a tuple or list of {len(layout)} tensors "
                                f"(one per skip state), got {type(down).__name__}")
            if len(down) != len(layout):
                raise ValueError(f"down_block_additional_residuals has {len(down)} tensors, this UNet has "
                                 f"{len(layout)} skip states (1 + levels·layers_per_block + levels − 1)")
            items += [(f"down_block_additional_residuals[{i}]", r, ck) for i, (r, ck) in enumerate(zip(down, layout))]
        if mid is not None:
            levels = len(self.config.channels)
            items.append(("mid_block_additional_residual", mid, (self.config.channels[-1], levels - 1)))
        for name, r, (c, k) in items:
            if not isinstance(r, Tensor) or not r.is_floating_point():
                kind = f"a {r.dtype} tensor" if isinstance(r, Tensor) else type(r).__name__
                raise TypeError(f"{name} must be a floating torch.Tensor, got {kind}")
            shape = (b, c, height >> k, width >> k)
            if tuple(r.shape) not in (shape, (b, c, 1, 1)):
                raise ValueError(f"{name} must have shape {shape} (or {(b, c, 1, 1)}: globally pooled), got "
                                 f"{tuple(r.shape)}")
            if r.device != x.device:
                raise ValueError(f"{name} is on {r.device} but x is on {x.device}")

    def _guidance(self, guidance: Optional[Timesteps], batch: int, device: torch.device) -> Optional[Tensor]:
        dim = self.config.guidance_embedding_dim
        if dim is None:
            if guidance is not None:
                raise ValueError("guidance was given to a UNet without a guidance embedding "
                                 "(config.guidance_embedding_dim is None): guide it with the scheduler instead")
            return None
        if guidance is None:
            raise ValueError("this UNet was distilled with the guidance scale as an input "
                             "(config.guidance_embedding_dim is set): pass guidance, w as a number or a "
                             f"({batch},) tensor (1.0 = the conditional model alone)")
        if isinstance(guidance, Tensor) and not guidance.dtype.is_floating_point:
            raise ValueError(f"guidance must be a floating tensor (the guidance scale w), got dtype {guidance.dtype}")
        return self._timesteps(guidance, batch, device, name="guidance")
