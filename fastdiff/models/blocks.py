"""Building blocks shared by the UNet and the convolutional autoencoders.

Module and parameter names follow diffusers' (``ResnetBlock2D``: norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut; attention: group_norm, to_q, to_k, to_v, to_out; blocks: resnets, attentions, downsamplers,
upsamplers), so a diffusers state dict maps onto these modules by name. The one systematic difference:
diffusers' ``to_out`` is ``ModuleList([Linear, Dropout])`` (``to_out.0.weight``), here it is the Linear
(``to_out.weight``).

GroupNorm (+SiLU) goes through :class:`fastdiff.nn.GroupNormSiLU` (:class:`fastdiff.nn.GroupNorm` without SiLU)
and attention through :class:`fastdiff.nn.Attention`,
i.e. through ``fastdiff.ops``; nothing here calls nn.GroupNorm or scaled_dot_product_attention directly.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.nn import Attention, Conv2d, GroupNorm, GroupNormSiLU

AttentionFactory = Optional[Callable[[int], nn.Module]]


# --------------------------------------------------------------------------------------------- time embedding
def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (DDPM / "Attention is all you need"): t (B,) → (B, dim) fp32.

    freq_i = max_period ** (−i / (dim/2 − freq_shift)); the embedding is [sin(t·freq), cos(t·freq)] or, with
    ``flip_sin_to_cos``, [cos, sin] (diffusers' ``get_timestep_embedding`` with the same arguments).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the guidance scale w (B,) → (B, dim) fp32, for a guidance-distilled UNet (latent
    consistency models, Luo et al. 2023, §4.2; the embedding of VDM): [sin, cos] of (w − 1)·1000 at the frequencies
    10000^(−i/(dim/2 − 1)), i < dim/2 (zero-padded to an odd dim).

    w = 1 (the conditional model alone) embeds to [0…0, 1…1]. This is the ``timestep_cond`` diffusers'
    LatentConsistencyModelPipeline computes for its guidance_scale, so a UNet converted to UNet2DConditionModel
    (``time_cond_proj_dim``) takes exactly this input. Needs dim ≥ 4 (dim/2 − 1 > 0).
    """
    return timestep_embedding((w.float() - 1.0) * 1000.0, dim, flip_sin_to_cos=False, freq_shift=1.0)


class TimestepEmbedding(nn.Module):
    """The MLP after the sinusoidal embedding: linear_1 → SiLU → linear_2 (diffusers' TimestepEmbedding).

    With ``cond_dim`` a bias-free ``cond_proj`` (cond_dim → in_dim) adds a condition (B, cond_dim) to the sinusoidal
    input before linear_1: the guidance embedding of a guidance-distilled UNet (diffusers' ``cond_proj``, the same
    name and place, so its checkpoints map by name).
    """

    def __init__(self, in_dim: int, embed_dim: int, cond_dim: Optional[int] = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)  # (B, in_dim)
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------- residual block
class ResnetBlock2D(nn.Module):
    """x + conv2(drop(SiLU(GN(conv1(SiLU(GN(x))) + proj(emb))))), with a 1×1 shortcut when channels change.

    forward(x (B, C_in, H, W), emb (B, E) or None) → (B, C_out, H, W). ``emb`` is the time embedding already
    passed through SiLU (diffusers applies that SiLU inside every block; the UNet does it once).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNormSiLU(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(emb)[:, :, None, None]  # (B, C_out, 1, 1)
        h = self.conv2(self.dropout(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """3×3 convolution with stride 2. ``padding=0`` pads right/bottom by one first (the LDM/KL-VAE encoder)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# --------------------------------------------------------------------------------------------- attention blocks
def _to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W, C); a view for channels_last input."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _to_image(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, H·W, C) → (B, C, H, W) with channels_last strides (a view, no copy)."""
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def attention_heads(channels: int, head_dim: Optional[int], num_heads: Optional[int]) -> tuple[int, int]:
    """(heads, dim_head) for a block of ``channels``: a fixed head count, a fixed head width, or one head."""
    if num_heads is not None:
        return num_heads, channels // num_heads
    if head_dim is not None:
        return channels // head_dim, head_dim
    return 1, channels


class SpatialSelfAttention(Attention):
    """Self-attention over the H·W positions of a feature map with a GroupNorm in front and a residual
    (diffusers' ``Attention`` as used by AttnDownBlock2D / UNetMidBlock2D: q, k, v with bias).

    forward(x (B, C, H, W), context ignored) → (B, C, H, W).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int, eps: float):
        super().__init__(channels, None, heads=heads, dim_head=dim_head, qkv_bias=True, out_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:  # context: the blocks' uniform signature
        h, w = x.shape[2:]
        out = super().forward(_to_tokens(self.group_norm(x)))  # (B, H·W, C)
        return x + _to_image(out, h, w)


class GEGLU(nn.Module):
    """proj(x) = [a, g] → a · GELU(g) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4× wide. ``net`` = [GEGLU, Dropout, Linear] so parameter names match diffusers'."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Latent-diffusion transformer block on tokens: x += attn1(LN(x)); x += attn2(LN(x), context); x += ff(LN(x)).

    forward(x (B, N, dim), context (B, M, context_dim)) → (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, dim_head=dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm → proj_in → transformer block(s) over H·W tokens with cross-attention → proj_out, plus residual
    (diffusers' Transformer2DModel; 1×1 convolutions, or Linear with ``use_linear_projection``).

    forward(x (B, C, H, W), context (B, M, context_dim)) → (B, C, H, W).
    """

    norm_eps = 1e-6  # fixed in diffusers' Transformer2DModel, whatever the UNet's norm_eps

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, groups: int,
                 use_linear_projection: bool = False, dropout: float = 0.0, depth: int = 1):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, self.norm_eps)
        self.proj_in = nn.Linear(channels, inner) if use_linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h, w = x.shape[2:]
        hidden = self.norm(x)
        if not self.use_linear_projection:
            hidden = self.proj_in(hidden)
        tokens = _to_tokens(hidden)  # (B, H·W, inner)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            return x + _to_image(self.proj_out(tokens), h, w)
        return x + self.proj_out(_to_image(tokens, h, w))


# --------------------------------------------------------------------------------------------- resolution blocks
class DownBlock2D(nn.Module):
    """``num_layers`` residual blocks (each followed by attention if given), then an optional stride-2 downsample.

    forward(x, emb, context) → (x, states): ``states`` are the outputs after every block and the downsample (the
    UNet's skip connections).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, temb_channels: Optional[int],
                 groups: int, eps: float, add_downsample: bool, downsample_padding: int = 1,
                 attention: AttentionFactory = None, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps, dropout)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(attention(out_channels) for _ in range(num_layers)) if attention else None
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, downsample_padding)])
                             if add_downsample else None)

    def forward(self, x: Tensor, emb: Optional[Tensor] = None,
                context: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock2D(nn.Module):
    """``num_layers`` residual blocks (+ attention), then an optional ×2 upsample.

    With ``skip_channels`` (the UNet) block i first concatenates the next skip state along channels; without
    (the autoencoder decoder) it is a plain stack. forward(x, skips (list, consumed from the end), emb, context).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, temb_channels: Optional[int],
                 groups: int, eps: float, add_upsample: bool, skip_channels: Optional[list[int]] = None,
                 attention: AttentionFactory = None, dropout: float = 0.0):
        super().__init__()
        skip_channels = skip_channels or [0] * num_layers
        self.resnets = nn.ModuleList(
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip_channels[i], out_channels, temb_channels,
                          groups, eps, dropout)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(attention(out_channels) for _ in range(num_layers)) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, skips: Optional[list[Tensor]] = None, emb: Optional[Tensor] = None,
                context: Optional[Tensor] = None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Module):
    """resnet → attention (optional) → resnet at the lowest resolution (diffusers' UNetMidBlock2D[CrossAttn])."""

    def __init__(self, channels: int, temb_channels: Optional[int], groups: int, eps: float,
                 attention: AttentionFactory = None, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, dropout) for _ in range(2))
        self.attentions = nn.ModuleList([attention(channels)]) if attention else None

    def forward(self, x: Tensor, emb: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        x = self.resnets[0](x, emb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)
