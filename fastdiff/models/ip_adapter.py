"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models"): an image prompt for a text-to-image UNet that stays frozen.

- :class:`ImageEncoder`: the image → one embedding (B, projection_dim), as a CLIP image tower gives one; fastdiff's
  is small (three strided convolutions with GroupNorm+SiLU, then a linear projection) and trained contrastively
  against the frozen text encoder of the base model (``fastdiff train digits-ip-adapter``).
- :class:`IPAdapter`: the embedding → ``num_tokens`` image tokens (B, K, cross_attention_dim) (``image_proj``:
  Linear + LayerNorm, diffusers' ``ImageProjection`` layout), and for every cross-attention layer of the UNet its own
  key/value projections of those tokens (``to_k_ip`` / ``to_v_ip``). Decoupled cross-attention: each layer computes

      out = attention(q, k_text, v_text) + ip_adapter_scale · attention(q, to_k_ip(tokens), to_v_ip(tokens))

  (both through :func:`fastdiff.ops.attention`, the fused kernel on the GPU) before its output projection, with the
  query ``q`` of the text cross-attention. The UNet's own weights are not touched.

Attaching: ``adapter.attach(unet)`` hooks the adapter's layers into the UNet's cross-attention modules (a plain
attribute of each, not a submodule: the UNet's ``state_dict`` and parameters stay exactly the base model's);
``adapter.detach(unet)`` removes them. An attached adapter does nothing until tokens are given:
``with adapter.conditioned(tokens, scale): unet(x, t, context=text)`` runs the image branch on ``tokens`` (B, K,
cross_attention_dim) = ``adapter(image_embeds)``, the batch of x. Without tokens (or outside the block) the UNet
computes exactly what it computes alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.nn import Attention, GroupNormSiLU
from fastdiff.validation import check_positive_int

__all__ = ["ImageEncoder", "ImageEncoderConfig", "IPAdapter", "IPAdapterConfig", "cross_attention_layers"]


# --------------------------------------------------------------------------------------------- image encoder
@dataclass
class ImageEncoderConfig:
    in_channels: int = 1
    sample_size: int = 16  # H = W of the images it takes
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # 3×3 convolutions: stride 1, then stride 2 each
    norm_num_groups: int = 8
    projection_dim: int = 64  # the embedding's width (the text encoder's projection_dim when trained against it)

    def __post_init__(self):
        normalize_config(self)
        for name in ("in_channels", "sample_size", "norm_num_groups", "projection_dim"):
            check_positive_int(name, getattr(self, name))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must hold at least one channel count, got ()")
        for i, c in enumerate(self.block_out_channels):
            check_positive_int(f"block_out_channels[{i}]", c)
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide block_out_channels[{i}]={c}")
        if self.sample_size % self.downsample_factor:
            raise ValueError(f"sample_size={self.sample_size} must be a multiple of "
                             f"2**(len(block_out_channels) − 1) = {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class ImageEncoder(ModelMixin):
    """An image → its embedding: ``forward(pixel_values)`` with pixel_values (B, in_channels, sample_size,
    sample_size) floating in [−1, 1] (the models' pixel range) → (B, projection_dim) in the input's dtype.

    Layers: per entry of ``block_out_channels`` a 3×3 convolution (stride 1 for the first, 2 after) and a fused
    GroupNorm+SiLU (:class:`fastdiff.nn.GroupNormSiLU`), then ``proj`` (Linear of the flattened features).
    Raises TypeError / ValueError naming ``pixel_values`` for a wrong type, rank, channel count or size.
    """

    config_class = ImageEncoderConfig

    def __init__(self, config: Optional[ImageEncoderConfig] = None, **overrides):
        super().__init__()
        self.config = cfg = build_config(ImageEncoderConfig, config, overrides)
        layers, c_in = [], cfg.in_channels
        for i, c in enumerate(cfg.block_out_channels):
            layers += [nn.Conv2d(c_in, c, 3, 1 if i == 0 else 2, 1), GroupNormSiLU(cfg.norm_num_groups, c)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = cfg.sample_size // cfg.downsample_factor
        self.proj = nn.Linear(c_in * side * side, cfg.projection_dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        cfg = self.config
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
            got = pixel_values.dtype if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise TypeError(f"pixel_values must be a floating torch.Tensor, got {got}")
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}")
        return self.proj(self.features(pixel_values).flatten(1))


# --------------------------------------------------------------------------------------------- the adapter
def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention modules (``…transformer_blocks.i.attn2``) as (qualified name, module), in module
    order: the layers an IP-Adapter adds its image branch to."""
    from fastdiff.models.blocks import BasicTransformerBlock

    return [(f"{name}.attn2", m.attn2) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


@dataclass
class IPAdapterConfig:
    image_embed_dim: int = 64  # width of the image encoder's embedding
    cross_attention_dim: int = 64  # the UNet's context_dim: width of the image tokens
    num_tokens: int = 4  # K image tokens per image
    layer_names: tuple[str, ...] = ()  # the UNet's cross-attention modules it attaches to (cross_attention_layers)
    layer_heads: tuple[int, ...] = ()  # heads of each
    layer_head_dims: tuple[int, ...] = ()  # dim_head of each

    def __post_init__(self):
        normalize_config(self)
        for name in ("image_embed_dim", "cross_attention_dim", "num_tokens"):
            check_positive_int(name, getattr(self, name))
        n = len(self.layer_names)
        if n == 0:
            raise ValueError("layer_names must name at least one cross-attention layer (IPAdapter.from_unet fills it)")
        if len(self.layer_heads) != n or len(self.layer_head_dims) != n:
            raise ValueError(f"layer_heads ({len(self.layer_heads)}) and layer_head_dims ({len(self.layer_head_dims)}) "
                             f"must have one entry per name of layer_names ({n})")
        for i in range(n):
            check_positive_int(f"layer_heads[{i}]", self.layer_heads[i])
            check_positive_int(f"layer_head_dims[{i}]", self.layer_head_dims[i])


class ImageProjection(nn.Module):
    """(B, image_embed_dim) → (B, num_tokens, cross_attention_dim): Linear to K·d, then LayerNorm per token."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.image_embeds(embeds).view(embeds.shape[0], self.num_tokens, -1))


class IPAttention(nn.Module):
    """One layer's image key/value projections: ``to_k_ip``, ``to_v_ip`` (cross_attention_dim → heads·dim_head)."""

    def __init__(self, cross_attention_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_k_ip = nn.Linear(cross_attention_dim, heads * dim_head, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, heads * dim_head, bias=False)

    def branch(self, q: Tensor, tokens: Tensor) -> Tensor:
        """attention(q, to_k_ip(tokens), to_v_ip(tokens)): q (B, H, N, D), tokens (B, K, d) → (B, H, N, D)."""
        b, k = tokens.shape[:2]
        key = self.to_k_ip(tokens).view(b, k, self.heads, self.dim_head).transpose(1, 2)  # (B, H, K, D)
        value = self.to_v_ip(tokens).view(b, k, self.heads, self.dim_head).transpose(1, 2)
        return ops.attention(q, key, value)


class _State:
    """What an attached adapter's layers read during a forward: the image tokens (or None: no image branch) and the
    scale (a float, or a 0-dim tensor a CUDA graph reads at a fixed address)."""

    __slots__ = ("tokens", "scale")

    def __init__(self):
        self.tokens: Optional[Tensor] = None
        self.scale: Union[float, Tensor] = 1.0


class _Hook:
    """Set on a UNet cross-attention module as ``_ip`` (a plain attribute, so not a submodule): adds the image
    branch to the module's attention output (:meth:`fastdiff.nn.Attention.forward` calls it)."""

    __slots__ = ("adapter_id", "layer", "state")

    def __init__(self, adapter_id: int, layer: IPAttention, state: _State):
        self.adapter_id, self.layer, self.state = adapter_id, layer, state

    def __call__(self, q: Tensor, out: Tensor) -> Tensor:
        tokens = self.state.tokens
        if tokens is None:
            return out
        if tokens.shape[0] != q.shape[0]:
            raise ValueError(f"the IP-Adapter's image tokens have batch {tokens.shape[0]} but the UNet's input has "
                             f"{q.shape[0]}: give one image embedding per sample (under guidance: [uncond; cond])")
        return out + self.state.scale * self.layer.branch(q, tokens)


class IPAdapter(ModelMixin):
    """Image prompts for a cross-attention UNet: ``IPAdapter.from_unet(unet, image_embed_dim=64, num_tokens=4)``
    (its usual start: each layer's ``to_k_ip`` / ``to_v_ip`` copied from that layer's text ``to_k`` / ``to_v``, as
    the IP-Adapter paper initialises them), or ``IPAdapter(IPAdapterConfig(...))``.

    forward(image_embeds (B, image_embed_dim) floating) → image tokens (B, num_tokens, cross_attention_dim).
    :meth:`attach` / :meth:`detach` hook it into a UNet (see the module docstring); :meth:`conditioned` sets the
    tokens and the scale its layers use. The decoupled branch runs through :func:`fastdiff.ops.attention`.
    """

    config_class = IPAdapterConfig

    def __init__(self, config: Optional[IPAdapterConfig] = None, **overrides):
        super().__init__()
        # no valid default (the layers are the UNet's): built from the keywords alone when no config is given
        self.config = cfg = (IPAdapterConfig(**overrides) if config is None
                             else build_config(IPAdapterConfig, config, overrides))
        self.image_proj = ImageProjection(cfg.image_embed_dim, cfg.cross_attention_dim, cfg.num_tokens)
        self.layers = nn.ModuleList(IPAttention(cfg.cross_attention_dim, h, d)
                                    for h, d in zip(cfg.layer_heads, cfg.layer_head_dims))
        self._state = _State()

    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int = 64, num_tokens: int = 4) -> "IPAdapter":
        """An adapter for ``unet`` (a UNet with ``config.context_dim``): one layer per cross-attention module, its
        image key/value projections starting as copies of the module's text ones."""
        context_dim = getattr(getattr(unet, "config", None), "context_dim", None)
        if context_dim is None:
            raise ValueError("unet must be a cross-attention UNet (config.context_dim set): an IP-Adapter adds to "
                             "its cross-attention")
        layers = cross_attention_layers(unet)
        adapter = cls(image_embed_dim=image_embed_dim, cross_attention_dim=context_dim, num_tokens=num_tokens,
                      layer_names=tuple(n for n, _ in layers), layer_heads=tuple(m.heads for _, m in layers),
                      layer_head_dims=tuple(m.dim_head for _, m in layers))
        with torch.no_grad():
            for layer, (_, attn) in zip(adapter.layers, layers):
                layer.to_k_ip.weight.copy_(attn.to_k.weight)
                layer.to_v_ip.weight.copy_(attn.to_v.weight)
        param = next(unet.parameters())
        return adapter.to(param.device, param.dtype)

    def forward(self, image_embeds: Tensor) -> Tensor:
        d = self.config.image_embed_dim
        if not isinstance(image_embeds, Tensor) or not image_embeds.is_floating_point():
            got = image_embeds.dtype if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
            raise TypeError(f"image_embeds must be a floating torch.Tensor (B, {d}), got {got}")
        if image_embeds.ndim != 2 or image_embeds.shape[1] != d or image_embeds.shape[0] < 1:
            raise ValueError(f"image_embeds must have shape (B, {d}), got {tuple(image_embeds.shape)}")
        return self.image_proj(image_embeds)

    # ----------------------------------------------------------------- attaching to a UNet
    def check_unet(self, unet: nn.Module, name: str = "unet") -> None:
        """ValueError (naming ``name``) unless ``unet`` has this adapter's cross-attention layers: the same names,
        heads, head widths and context width."""
        cfg = self.config
        found = dict(cross_attention_layers(unet))
        context_dim = getattr(getattr(unet, "config", None), "context_dim", None)
        if context_dim != cfg.cross_attention_dim:
            raise ValueError(f"{name}.config.context_dim is {context_dim!r} but the IP-Adapter's cross_attention_dim "
                             f"is {cfg.cross_attention_dim}: the adapter was made for another UNet")
        if sorted(found) != sorted(cfg.layer_names):
            raise ValueError(f"{name}'s cross-attention layers {sorted(found)} are not the IP-Adapter's "
                             f"{sorted(cfg.layer_names)}: the adapter was made for another UNet")
        for lname, heads, dim_head in zip(cfg.layer_names, cfg.layer_heads, cfg.layer_head_dims):
            attn = found[lname]
            if (attn.heads, attn.dim_head) != (heads, dim_head):
                raise ValueError(f"{name}.{lname} has {attn.heads} heads of {attn.dim_head} but the IP-Adapter's "
                                 f"layer has {heads} of {dim_head}: the adapter was made for another UNet")

    def attach(self, unet: nn.Module) -> None:
        """Hook this adapter's layers into ``unet``'s cross-attention modules (replacing another adapter's hooks).
        The UNet's parameters, buffers and ``state_dict`` are unchanged."""
        self.check_unet(unet)
        for lname, layer in zip(self.config.layer_names, self.layers):
            unet.get_submodule(lname)._ip = _Hook(id(self), layer, self._state)

    def detach(self, unet: nn.Module) -> None:
        """Remove this adapter's hooks from ``unet`` (others' and a UNet without hooks are left as they are)."""
        for _, attn in cross_attention_layers(unet):
            hook = attn.__dict__.get("_ip")
            if hook is not None and hook.adapter_id == id(self):
                del attn.__dict__["_ip"]

    def is_attached(self, unet: nn.Module) -> bool:
        """Whether every cross-attention layer of ``unet`` carries this adapter's hook."""
        layers = cross_attention_layers(unet)
        return bool(layers) and all(getattr(attn.__dict__.get("_ip"), "adapter_id", None) == id(self)
                                    for _, attn in layers)

    @contextlib.contextmanager
    def conditioned(self, tokens: Optional[Tensor], scale: Union[float, Tensor] = 1.0) -> Iterator[None]:
        """Within the block, the attached layers add ``scale`` × the attention to ``tokens`` (B, num_tokens,
        cross_attention_dim) (from :meth:`forward`; batch = the UNet input's). ``tokens=None``: no image branch."""
        cfg = self.config
        if tokens is not None:
            if not isinstance(tokens, Tensor) or not tokens.is_floating_point():
                raise TypeError(f"tokens must be a floating torch.Tensor, got "
                                f"{tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__}")
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (cfg.num_tokens, cfg.cross_attention_dim):
                raise ValueError(f"tokens must have shape (B, {cfg.num_tokens}, {cfg.cross_attention_dim}), got "
                                 f"{tuple(tokens.shape)}")
        state = self._state
        previous = state.tokens, state.scale
        state.tokens, state.scale = tokens, scale
        try:
            yield
        finally:
            state.tokens, state.scale = previous
