"""diffusers model configs ⇄ fastdiff model configs, in both directions, by hand (no diffusers needed).

* :func:`convert_config` — a diffusers UNet2DModel / UNet2DConditionModel / ControlNetModel / AutoencoderKL /
  VQModel config (a dict, a diffusers ``.config`` or a parsed config.json) → (fastdiff model class, its config).
* :func:`diffusers_config` — a fastdiff UNet / ControlNet / AutoencoderKL / VQVAE → (diffusers class name,
  constructor kwargs).

Reading a diffusers folder, mapping state-dict keys and building the models are in
:mod:`fastdiff.interop.diffusers_models`.

What a diffusers config maps onto (anything else is a ValueError that lists the unsupported values and what is
supported, raised before any weight is read):

* UNet2DModel: DownBlock2D / AttnDownBlock2D, UpBlock2D / AttnUpBlock2D (attention at the same levels on both
  paths), UNetMidBlock2D (with or without attention), positional time embedding (flip_sin_to_cos, freq_shift),
  nn.Embedding class conditioning (``num_class_embeds`` = fastdiff ``num_classes + 1``: the extra "null" class).
* UNet2DConditionModel: CrossAttnDownBlock2D / DownBlock2D, CrossAttnUpBlock2D / UpBlock2D,
  UNetMidBlock2DCrossAttn, transformer depth 1, one cross_attention_dim, use_linear_projection, per-level head counts
  that reduce to one head count or one head width, optional class embedding, and ``time_cond_proj_dim`` (an LCM's
  guidance embedding: fastdiff's ``guidance_embedding_dim``; fastdiff computes the ``timestep_cond`` from the
  guidance scale as diffusers' LatentConsistencyModelPipeline does, see ``blocks.guidance_embedding``).
* ControlNetModel: the encoder of a UNet2DConditionModel as above (its down blocks and UNetMidBlock2DCrossAttn; a
  ControlNet has no up path, no ``time_cond_proj_dim`` and no dropout), ``conditioning_channels``,
  ``conditioning_embedding_out_channels``, ``global_pool_conditions``, channel order "rgb". A fastdiff ControlNet
  without ``context_dim`` (of a pixel UNet2DModel-style UNet) has no diffusers equivalent: diffusers' ControlNetModel
  is built from UNet2DConditionModel blocks.
* AutoencoderKL and VQModel (``norm_type="group"``): DownEncoderBlock2D / UpDecoderBlock2D, SiLU, mid-block
  attention on or off, quant convs, scaling/shift factors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("fastdiff")

SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "VQModel", "ControlNetModel")

__all__ = ["SUPPORTED_MODELS", "convert_config", "diffusers_config"]

# What each diffusers class supports here, appended to every conversion error.
SUPPORTED_TEXT = {
    "UNet2DModel": "down blocks DownBlock2D/AttnDownBlock2D, up blocks UpBlock2D/AttnUpBlock2D mirroring them, mid "
                   "block UNetMidBlock2D (add_attention on or off), positional time embedding, num_class_embeds class "
                   "embedding, act_fn 'silu'",
    "UNet2DConditionModel": "down blocks CrossAttnDownBlock2D/DownBlock2D, up blocks CrossAttnUpBlock2D/UpBlock2D "
                            "mirroring them, mid block UNetMidBlock2DCrossAttn, transformer_layers_per_block 1, one "
                            "cross_attention_dim, use_linear_projection, head counts reducing to one head count or "
                            "one head width, num_class_embeds class embedding, positional time embedding, "
                            "time_cond_proj_dim (≥ 4: LCM's guidance embedding), act_fn 'silu'",
    "ControlNetModel": "down blocks CrossAttnDownBlock2D/DownBlock2D, mid block UNetMidBlock2DCrossAttn, "
                       "transformer_layers_per_block 1, one cross_attention_dim, use_linear_projection, head counts "
                       "reducing to one head count or one head width, num_class_embeds class embedding, positional "
                       "time embedding, act_fn 'silu', conditioning_channels, conditioning_embedding_out_channels, "
                       "global_pool_conditions, controlnet_conditioning_channel_order 'rgb'",
    "AutoencoderKL": "DownEncoderBlock2D/UpDecoderBlock2D blocks, act_fn 'silu', mid_block_add_attention, "
                     "use_quant_conv/use_post_quant_conv, scaling_factor/shift_factor",
    "VQModel": "DownEncoderBlock2D/UpDecoderBlock2D blocks, act_fn 'silu', norm_type 'group', mid_block_add_attention, "
               "num_vq_embeddings, vq_embed_dim, scaling_factor",
}

# diffusers' defaults (0.42) for the keys read here: a config.json written by an older diffusers may lack some.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "UNet2DModel": dict(
        sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
        time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
        downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
        norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
        add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None),
    "UNet2DConditionModel": dict(
        sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=1280, transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
        encoder_hid_dim=None, encoder_hid_dim_type=None, attention_head_dim=8, num_attention_heads=None,
        dual_cross_attention=False, use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
        addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False, resnet_time_scale_shift="default",
        resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
        time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
        conv_in_kernel=3, conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
        class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
        addition_embed_type_num_heads=64),
    "ControlNetModel": dict(
        in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
        norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1, encoder_hid_dim=None,
        encoder_hid_dim_type=None, attention_head_dim=8, num_attention_heads=None, use_linear_projection=False,
        class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
        upcast_attention=False, resnet_time_scale_shift="default", projection_class_embeddings_input_dim=None,
        controlnet_conditioning_channel_order="rgb", conditioning_embedding_out_channels=(16, 32, 96, 256),
        global_pool_conditions=False, addition_embed_type_num_heads=64),
    "AutoencoderKL": dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
        sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
        force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    "VQModel": dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=3, sample_size=32,
        num_vq_embeddings=256, norm_num_groups=32, vq_embed_dim=None, scaling_factor=0.18215, norm_type="group",
        mid_block_add_attention=True, lookup_from_codebook=False, force_upcast=False),
}
_SILU = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU
_AE_EPS = 1e-6  # GroupNorm epsilon diffusers' Encoder/Decoder hard-code


# --------------------------------------------------------------------------------------------- diffusers → fastdiff
class _Problems:
    """Collects every unsupported value of one config, so the error lists them all at once."""

    def __init__(self, class_name: str, where: str):
        self.class_name, self.where, self.items = class_name, where, []

    def add(self, message: str) -> None:
        self.items.append(message)

    def expect(self, cfg: Mapping, key: str, *allowed) -> None:
        value = cfg.get(key)
        if not any(_same(value, a) for a in allowed):
            self.add(f"{key}={value!r} (supported: {' or '.join(repr(a) for a in allowed)})")

    def check(self) -> None:
        if self.items:
            raise ValueError(f"{self.where}: cannot convert diffusers {self.class_name} to fastdiff: "
                             + "; ".join(self.items) + f". Supported: {SUPPORTED_TEXT[self.class_name]}")


def _same(value, allowed) -> bool:
    if allowed is None or value is None:
        return value is allowed
    if isinstance(allowed, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    return value == allowed


def _uniform(cfg: Mapping, key: str, n: int, problems: _Problems, what: str = "one value for every level"):
    """An int-or-list config value that must be one value for all n levels → that value (or None after a problem)."""
    value = cfg.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != n or len({json.dumps(v) for v in value}) != 1:
            problems.add(f"{key}={list(value)!r} (supported: {what})")
            return None
        return value[0]
    return value


def _attention_levels(cfg: Mapping, n: int, down_types: dict[str, bool], up_types: dict[str, bool],
                      problems: _Problems) -> tuple[int, ...]:
    """Levels with attention from the block types; checks the types and that the up path mirrors the down path."""
    down, up = list(cfg.get("down_block_types") or ()), list(cfg.get("up_block_types") or ())
    if len(down) != n or len(up) != n:
        problems.add(f"{len(down)} down_block_types and {len(up)} up_block_types for {n} block_out_channels "
                     f"(supported: one of each per level)")
        return ()
    ok = True
    for key, types, allowed in (("down_block_types", down, down_types), ("up_block_types", up, up_types)):
        for i, t in enumerate(types):
            if t not in allowed:
                problems.add(f"{key}[{i}]={t!r} (supported: {', '.join(allowed)})")
                ok = False
    levels = tuple(i for i, t in enumerate(down) if down_types.get(t))
    mirrored = tuple(sorted(n - 1 - j for j, t in enumerate(up) if up_types.get(t)))
    if ok and levels != mirrored:
        problems.add(f"up_block_types={up} do not mirror down_block_types={down} (supported: attention at the same "
                     f"levels on the down and the up path)")
    return levels


def _time_and_class(cfg: Mapping, channels: tuple[int, ...], problems: _Problems) -> int | None:
    """Checks shared by both UNets; returns fastdiff's num_classes (num_class_embeds − 1: the last is the null
    class)."""
    problems.expect(cfg, "center_input_sample", False)
    problems.expect(cfg, "time_embedding_type", "positional")
    problems.expect(cfg, "time_embedding_dim", None, 4 * channels[0])
    problems.expect(cfg, "act_fn", *_SILU)
    problems.expect(cfg, "mid_block_scale_factor", 1)
    problems.expect(cfg, "resnet_time_scale_shift", "default")
    problems.expect(cfg, "downsample_padding", 1)
    problems.expect(cfg, "class_embed_type", None)
    if not isinstance(cfg.get("norm_num_groups"), int):
        problems.add(f"norm_num_groups={cfg.get('norm_num_groups')!r} (supported: an int)")
    n = cfg.get("num_class_embeds")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        problems.add(f"num_class_embeds={n!r} (supported: None or an int ≥ 2: the classes plus fastdiff's null class)")
        return None
    return n - 1


def _head_options(sites: list[tuple[int, int]], prefer: str) -> list[dict]:
    """fastdiff head settings equivalent to (channels, heads) at every attention site, most natural first."""
    if not sites:
        return [{"attention_head_dim": None, "num_attention_heads": None}]
    if all(h == 1 for _, h in sites):
        return [{"attention_head_dim": None, "num_attention_heads": None}]  # one head everywhere
    widths = {c // h for c, h in sites}
    heads = {h for _, h in sites}
    by_width = [{"attention_head_dim": widths.pop(), "num_attention_heads": None}] if len(widths) == 1 else []
    by_heads = [{"attention_head_dim": None, "num_attention_heads": heads.pop()}] if len(heads) == 1 else []
    return by_width + by_heads if prefer == "width" else by_heads + by_width


def _unet_config(base: dict, sites: list[tuple[int, int]], prefer: str, problems: _Problems):
    """A UNetConfig from the mapped fields and the first head setting fastdiff accepts."""
    from fastdiff.models.unet import UNetConfig

    for c, h in sites:
        if h < 1 or c % h:
            problems.add(f"attention at {c} channels with {h} heads (supported: heads dividing the channels)")
    problems.check()
    errors = []
    for option in _head_options(sites, prefer):
        try:
            return UNetConfig(**base, **option)
        except ValueError as exc:
            errors.append(str(exc))
    desc = ", ".join(f"{h} heads at {c} channels" for c, h in sites)
    problems.add(f"attention heads ({desc}) do not reduce to one head width or one head count that divides every "
                 f"level's channels {base['block_out_channels']}" + (f" ({'; '.join(errors)})" if errors else ""))
    problems.check()


def _unet2d(cfg: Mapping, problems: _Problems):
    channels = tuple(cfg["block_out_channels"])
    num_classes = _time_and_class(cfg, channels, problems)
    problems.expect(cfg, "mid_block_type", "UNetMidBlock2D")
    problems.expect(cfg, "downsample_type", "conv")
    problems.expect(cfg, "upsample_type", "conv")
    problems.expect(cfg, "attn_norm_num_groups", None, cfg.get("norm_num_groups"))
    levels = _attention_levels(cfg, len(channels), {"DownBlock2D": False, "AttnDownBlock2D": True},
                               {"UpBlock2D": False, "AttnUpBlock2D": True}, problems)
    if not isinstance(cfg.get("layers_per_block"), int):
        problems.add(f"layers_per_block={cfg.get('layers_per_block')!r} (supported: an int)")
    problems.check()
    mid = bool(cfg.get("add_attention", True))
    width = cfg.get("attention_head_dim")  # UNet2DModel: channels per head (None: one head)
    sites = [(channels[i], channels[i] // width if width else 1) for i in levels]
    if width and any(channels[i] % width for i in levels):
        problems.add(f"attention_head_dim={width} does not divide the channels of every attention level")
    if mid:
        sites.append((channels[-1], channels[-1] // width if width else 1))
    base = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], block_out_channels=channels,
                layers_per_block=cfg["layers_per_block"], attention_levels=levels, mid_attention=mid,
                norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"], num_classes=num_classes,
                context_dim=None, dropout=float(cfg.get("dropout") or 0.0),
                flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]), freq_shift=cfg["freq_shift"])
    return _unet_config(base, sites, "width", problems)


def _unet2d_condition(cfg: Mapping, problems: _Problems):
    channels = tuple(cfg["block_out_channels"])
    n = len(channels)
    num_classes = _time_and_class(cfg, channels, problems)
    problems.expect(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn")
    for key in ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "time_embedding_act_fn",
                "timestep_post_act", "projection_class_embeddings_input_dim",
                "cross_attention_norm", "reverse_transformer_layers_per_block"):
        problems.expect(cfg, key, None)
    for key in ("dual_cross_attention", "resnet_skip_time_act", "class_embeddings_concat"):
        problems.expect(cfg, key, False)
    problems.expect(cfg, "mid_block_only_cross_attention", None, False)
    problems.expect(cfg, "resnet_out_scale_factor", 1)
    problems.expect(cfg, "conv_in_kernel", 3)
    problems.expect(cfg, "conv_out_kernel", 3)
    problems.expect(cfg, "attention_type", "default")
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross is not False:
        problems.add(f"only_cross_attention={only_cross!r} (supported: False)")
    depth = cfg.get("transformer_layers_per_block", 1)
    if any(d != 1 for d in (depth if isinstance(depth, (list, tuple)) else [depth])):
        problems.add(f"transformer_layers_per_block={depth!r} (supported: 1, fastdiff's transformer depth)")
    layers = _uniform(cfg, "layers_per_block", n, problems)
    guidance_dim = cfg.get("time_cond_proj_dim")
    if guidance_dim is not None and (isinstance(guidance_dim, bool) or not isinstance(guidance_dim, int)
                                     or guidance_dim < 4):
        problems.add(f"time_cond_proj_dim={guidance_dim!r} (supported: None or an int ≥ 4, LCM's guidance embedding)")
    context_dim = _uniform(cfg, "cross_attention_dim", n, problems)
    levels = _attention_levels(cfg, n, {"DownBlock2D": False, "CrossAttnDownBlock2D": True},
                               {"UpBlock2D": False, "CrossAttnUpBlock2D": True}, problems)
    problems.check()
    # diffusers' naming quirk: in UNet2DConditionModel ``attention_head_dim`` is the number of heads. One count maps
    # to fastdiff's num_attention_heads; per-level counts usually come from one head width (SD 2.x: 64), tried first.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    prefer = "width" if isinstance(heads, (list, tuple)) else "heads"
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    if len(heads) != n or any(not isinstance(h, int) for h in heads):
        problems.add(f"attention_head_dim={cfg.get('attention_head_dim')!r} (supported: an int or one int per level)")
        problems.check()
    sites = [(channels[i], heads[i]) for i in levels] + [(channels[-1], heads[-1])]  # + the mid block
    base = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], block_out_channels=channels,
                layers_per_block=layers, attention_levels=levels, mid_attention=True,
                norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"], num_classes=num_classes,
                context_dim=context_dim, use_linear_projection=bool(cfg.get("use_linear_projection")),
                dropout=float(cfg.get("dropout") or 0.0), flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
                freq_shift=cfg["freq_shift"], guidance_embedding_dim=guidance_dim)
    return _unet_config(base, sites, prefer, problems)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _controlnet(cfg: Mapping, problems: _Problems):
    """A ControlNetModel is a UNet2DConditionModel's encoder: checked as that UNet (with the up path mirroring the
    down path, which a ControlNet does not have), plus the control map's options."""
    from fastdiff.models.controlnet import UNET_FIELDS, ControlNetConfig

    problems.expect(cfg, "controlnet_conditioning_channel_order", "rgb")
    problems.expect(cfg, "global_pool_conditions", False, True)
    cond = cfg.get("conditioning_channels")
    if not _positive_int(cond):
        problems.add(f"conditioning_channels={cond!r} (supported: a positive int)")
    stages = cfg.get("conditioning_embedding_out_channels")
    if not isinstance(stages, (list, tuple)) or not stages or not all(_positive_int(c) for c in stages):
        problems.add(f"conditioning_embedding_out_channels={stages!r} (supported: a non-empty list of positive ints)")
    down = list(cfg.get("down_block_types") or ())
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    unet = _unet2d_condition({**_DEFAULTS["UNet2DConditionModel"], **cfg, "up_block_types": up,
                              "out_channels": cfg["in_channels"]}, problems)
    return ControlNetConfig(**{name: getattr(unet, name) for name in UNET_FIELDS}, conditioning_channels=cond,
                            conditioning_embedding_out_channels=tuple(stages),
                            global_pool_conditions=cfg["global_pool_conditions"])


def _autoencoder_common(cfg: Mapping, problems: _Problems) -> dict:
    n = len(cfg["block_out_channels"])
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key) or ())
        if len(types) != n or any(t != allowed for t in types):
            problems.add(f"{key}={types!r} (supported: {allowed!r} for each of the {n} levels)")
    problems.expect(cfg, "act_fn", *_SILU)
    return dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                latent_channels=cfg["latent_channels"], block_out_channels=tuple(cfg["block_out_channels"]),
                layers_per_block=cfg["layers_per_block"], norm_num_groups=cfg["norm_num_groups"], norm_eps=_AE_EPS,
                mid_attention=bool(cfg.get("mid_block_add_attention", True)))


def _autoencoder_kl(cfg: Mapping, problems: _Problems):
    from fastdiff.models.vae import AutoencoderKLConfig

    fields = _autoencoder_common(cfg, problems)
    problems.check()
    return AutoencoderKLConfig(**fields, use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                               use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                               scaling_factor=float(cfg["scaling_factor"]), shift_factor=cfg.get("shift_factor"))


def _vq_model(cfg: Mapping, problems: _Problems):
    from fastdiff.models.vqvae import VQVAEConfig

    fields = _autoencoder_common(cfg, problems)
    problems.expect(cfg, "norm_type", "group")
    problems.check()
    return VQVAEConfig(**fields, num_embeddings=cfg["num_vq_embeddings"], embedding_dim=cfg.get("vq_embed_dim"),
                       scaling_factor=float(cfg["scaling_factor"]), beta=0.25)


_CONVERTERS = {"UNet2DModel": _unet2d, "UNet2DConditionModel": _unet2d_condition, "AutoencoderKL": _autoencoder_kl,
               "VQModel": _vq_model, "ControlNetModel": _controlnet}


def convert_config(class_name: str, config: Mapping, where: str = "config") -> tuple[type, Any]:
    """(fastdiff model class, its config) for a diffusers model config (a dict, a diffusers ``.config`` or a parsed
    config.json). Raises ValueError listing every unsupported value and what is supported; ``where`` starts the
    message (a file path or a description)."""
    from fastdiff.models import VQVAE, AutoencoderKL, ControlNet, UNet

    if class_name not in _CONVERTERS:
        raise ValueError(f"{where}: diffusers model class {class_name!r} is not supported; fastdiff converts "
                         f"{', '.join(SUPPORTED_MODELS)}")
    defaults = _DEFAULTS[class_name]
    given = {k: v for k, v in config.items() if not str(k).startswith("_")}
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
        logger.warning("fastdiff: %s: ignoring %s config key(s) fastdiff does not know: %s", where, class_name, unknown)
    cfg = {**defaults, **given}
    problems = _Problems(class_name, where)
    try:
        fd_config = _CONVERTERS[class_name](cfg, problems)
    except (KeyError, TypeError) as exc:  # a malformed value (e.g. a string where channels belong)
        raise ValueError(f"{where}: malformed diffusers {class_name} config ({type(exc).__name__}: {exc})") from exc
    model_class = {"UNet2DModel": UNet, "UNet2DConditionModel": UNet, "AutoencoderKL": AutoencoderKL,
                   "VQModel": VQVAE, "ControlNetModel": ControlNet}[class_name]
    return model_class, fd_config


# --------------------------------------------------------------------------------------------- fastdiff → diffusers
def _int_if_integral(x):
    return int(x) if float(x).is_integer() else x


def _unet_kwargs(cfg, sample_size, what: str = "UNet") -> tuple[str, dict]:
    """(UNet2DModel or UNet2DConditionModel, constructor kwargs) for a fastdiff UNetConfig; ``what`` names the model
    in errors."""
    from fastdiff.models.blocks import attention_heads

    ch, n = tuple(cfg.channels), len(cfg.channels)
    levels = set(cfg.attention_levels)
    heads = [attention_heads(c, cfg.attention_head_dim, cfg.num_attention_heads) for c in ch]  # (heads, width)
    kwargs = dict(sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  block_out_channels=ch, layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                  norm_eps=cfg.norm_eps, dropout=cfg.dropout, flip_sin_to_cos=cfg.flip_sin_to_cos,
                  freq_shift=_int_if_integral(cfg.freq_shift),
                  num_class_embeds=cfg.num_classes + 1 if cfg.num_classes is not None else None)
    if cfg.context_dim is None:
        if cfg.guidance_embedding_dim is not None:
            raise ValueError(f"guidance_embedding_dim={cfg.guidance_embedding_dim} is not supported by diffusers' "
                             f"UNet2DModel (it has no time_cond_proj_dim); only a UNet with context_dim, which "
                             f"converts to UNet2DConditionModel, carries the guidance embedding to diffusers")
        sites = [heads[i] for i in sorted(levels)] + ([heads[-1]] if cfg.mid_attention else [])
        widths = {w for _, w in sites}
        if len(widths) == 1:
            width = widths.pop()
        elif all(h == 1 for h, _ in sites):
            width = None  # diffusers: one head as wide as each block
        else:
            raise ValueError(f"UNet2DModel has one attention_head_dim (channels per head) for every level; this "
                             f"{what}'s attention layers have head widths {sorted(widths)}")
        down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
        up = tuple("AttnUpBlock2D" if n - 1 - j in levels else "UpBlock2D" for j in range(n))
        return "UNet2DModel", dict(kwargs, down_block_types=down, up_block_types=up,
                                   mid_block_type="UNetMidBlock2D", add_attention=cfg.mid_attention,
                                   attention_head_dim=width)
    if not cfg.mid_attention:
        raise ValueError(f"UNet2DConditionModel's middle block always has cross-attention "
                         f"(UNetMidBlock2DCrossAttn); this {what} has mid_attention=False")
    head_counts = tuple(h for h, _ in heads)
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if n - 1 - j in levels else "UpBlock2D" for j in range(n))
    return "UNet2DConditionModel", dict(
        kwargs, down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_projection,
        time_cond_proj_dim=cfg.guidance_embedding_dim,
        # diffusers' naming quirk: attention_head_dim is the head count here
        attention_head_dim=head_counts[0] if len(set(head_counts)) == 1 else head_counts)


def diffusers_config(model, sample_size=None) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of the diffusers model equivalent to a fastdiff UNet, ControlNet
    (→ ControlNetModel; ``sample_size`` does not apply), AutoencoderKL or VQVAE. Raises ValueError for a fastdiff
    config diffusers cannot express, TypeError otherwise."""
    from fastdiff.models import VQVAE, AutoencoderKL, ControlNet, UNet, UNetConfig

    if isinstance(model, UNet):
        return _unet_kwargs(model.config, sample_size)
    if isinstance(model, ControlNet):
        cfg = model.config
        if cfg.context_dim is None:
            raise ValueError("diffusers' ControlNetModel is the encoder of a UNet2DConditionModel (cross-attention "
                             "blocks, UNetMidBlock2DCrossAttn); this ControlNet has no context_dim (the encoder of a "
                             "UNet2DModel-style UNet), which has no diffusers equivalent")
        _, kwargs = _unet_kwargs(UNetConfig(**cfg.unet_fields(), out_channels=cfg.in_channels), None, "ControlNet")
        for key in ("sample_size", "out_channels", "up_block_types", "dropout", "time_cond_proj_dim"):
            del kwargs[key]  # no such ControlNetModel options: it has no up path, dropout or guidance embedding
        return "ControlNetModel", dict(kwargs, conditioning_channels=cfg.conditioning_channels,
                                       conditioning_embedding_out_channels=cfg.conditioning_embedding_out_channels,
                                       global_pool_conditions=cfg.global_pool_conditions)
    if isinstance(model, (AutoencoderKL, VQVAE)):
        cfg = model.config
        if cfg.norm_eps != _AE_EPS:
            raise ValueError(f"diffusers' autoencoders fix the GroupNorm epsilon at {_AE_EPS}; this model has "
                             f"norm_eps={cfg.norm_eps}")
        n = len(cfg.block_out_channels)
        kwargs = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                      act_fn="silu", latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                      scaling_factor=cfg.scaling_factor, mid_block_add_attention=cfg.mid_attention)
        if sample_size is not None:
            kwargs["sample_size"] = sample_size
        if isinstance(model, AutoencoderKL):
            return "AutoencoderKL", dict(kwargs, shift_factor=cfg.shift_factor, use_quant_conv=cfg.use_quant_conv,
                                         use_post_quant_conv=cfg.use_post_quant_conv)
        return "VQModel", dict(kwargs, num_vq_embeddings=cfg.num_embeddings, vq_embed_dim=cfg.embedding_dim,
                               norm_type="group")
    raise TypeError(f"fastdiff.to_diffusers converts a fastdiff ControlNet, UNet, AutoencoderKL, VQVAE or "
                    f"DiffusionPipeline, got {type(model).__name__}")
