"""``accelerate(obj)`` / ``restore(obj)``: run an existing nn.Module or diffusers pipeline through fastdiff's fused ops
in place, and undo it exactly.

What is replaced (counted per kind, see :func:`accelerate_report`):

* ``group_norm_silu``: an ``nn.GroupNorm`` directly followed by ``nn.SiLU`` becomes one
  :func:`fastdiff.ops.group_norm_silu` call. The GroupNorm object stays where it is, with its parameters: only its
  class is swapped for a subclass whose forward also applies the SiLU, and the SiLU module it replaces becomes an
  ``nn.Identity`` — so state-dict keys and values and parameter objects are untouched. Where the pattern is found:
  diffusers' ``ResnetBlock2D`` (``norm1`` → ``nonlinearity`` and ``norm2`` → ``nonlinearity``, with
  ``time_embedding_norm`` "default" or "group"; the block's shared SiLU also activates the time embedding, so that
  SiLU moves into ``time_emb_proj``, again by a class swap), ``conv_norm_out`` → ``conv_act`` of diffusers' UNet2DModel,
  UNet2DConditionModel, Encoder and Decoder, and consecutive GroupNorm, SiLU children of any ``nn.Sequential``.
* ``attention``: every diffusers ``Attention`` whose processor is diffusers' default (``AttnProcessor2_0`` or
  ``AttnProcessor``) gets a :class:`FastdiffAttnProcessor` (``Attention.set_processor``), which reproduces
  AttnProcessor2_0 with :func:`fastdiff.ops.attention` and hands calls with an ``attention_mask`` to the original
  processor.
* ``scheduler``: a diffusers pipeline's scheduler is swapped for fastdiff's scheduler of the same name (every class
  in :mod:`fastdiff.schedulers`) built from its config (fused step); a config fastdiff does not support keeps
  diffusers' scheduler (logged).

What is recorded lives in the object's ``_fastdiff_acceleration`` attribute; :func:`restore` replays it backwards.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.interop._deps import is_diffusers_object, require_diffusers

logger = logging.getLogger("fastdiff")

KINDS = ("group_norm_silu", "attention", "scheduler")
_STATE = "_fastdiff_acceleration"
_NORM_OUT_OWNERS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")  # conv_norm_out → conv_act
_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")

__all__ = ["KINDS", "FastdiffAttnProcessor", "accelerate", "accelerate_report", "restore"]


# --------------------------------------------------------------------------------------------- fused modules
class FusedGroupNormSiLU(nn.GroupNorm):
    """An nn.GroupNorm whose forward also applies the SiLU that followed it: one fastdiff.ops.group_norm_silu call.

    Never constructed: :func:`accelerate` swaps the class of an existing nn.GroupNorm (same object, same parameters,
    same state-dict keys); :func:`restore` swaps it back.
    """

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


class SiLULinear(nn.Linear):
    """nn.Linear applied to SiLU(x): the time-embedding SiLU of a ResnetBlock2D whose shared ``nonlinearity`` went
    into its fused norms. Made by swapping the class of the block's ``time_emb_proj``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(x), self.weight, self.bias)


class FastdiffAttnProcessor:
    """diffusers attention processor with AttnProcessor2_0's semantics (spatial_norm, group_norm, norm_cross,
    norm_q/norm_k, residual_connection, rescale_output_factor) whose attention is :func:`fastdiff.ops.attention`.

    ``original`` is the processor it replaced: calls with an ``attention_mask`` go to it (fastdiff's attention has no
    mask), and :func:`restore` puts it back.
    """

    def __init__(self, original: Any = None):
        self.original = original
        # AttnProcessor2_0 lets SDPA use D**-0.5; the older AttnProcessor uses attn.scale
        self._attn_scale = type(original).__name__ != "AttnProcessor2_0"

    def _fallback(self):
        if self.original is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.original = AttnProcessor2_0()
        return self.original

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if attention_mask is not None:
            return self._fallback()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, H·W, C)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, D)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, D)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, D)
        if getattr(attn, "norm_q", None) is not None:  # (older diffusers' Attention has no norm_q / norm_k)
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        out = ops.attention(query, key, value, scale=attn.scale if self._attn_scale else None)  # (B, heads, N, D)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, heads·D)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# --------------------------------------------------------------------------------------------- the record
@dataclass
class _Patch:
    kind: str  # "class": owner.__class__ was original; "attr": owner.<name> was original; "processor"
    owner: Any
    name: str | None
    original: Any


@dataclass
class _Acceleration:
    patches: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))


def _swap_class(module: nn.Module, cls: type, state: _Acceleration) -> None:
    state.patches.append(_Patch("class", module, None, type(module)))
    module.__class__ = cls


def _set_attr(owner: Any, name: str, value: Any, state: _Acceleration) -> None:
    state.patches.append(_Patch("attr", owner, name, getattr(owner, name)))
    setattr(owner, name, value)


# --------------------------------------------------------------------------------------------- finding the patterns
def _fuse_resnet(block: nn.Module, state: _Acceleration) -> int:
    """diffusers ResnetBlock2D: norm1 → SiLU and norm2 → SiLU fused; the shared SiLU's third use (the time
    embedding) moves into time_emb_proj."""
    if getattr(block, "time_embedding_norm", None) not in ("default", "group"):
        return 0  # "scale_shift" modulates between norm2 and the SiLU: nothing to fuse there
    if not (type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm
            and type(block.nonlinearity) is nn.SiLU):
        return 0
    proj = block.time_emb_proj
    move_silu = proj is not None and not getattr(block, "skip_time_act", False)
    if move_silu and type(proj) is not nn.Linear:
        return 0  # e.g. a LoRA layer: leave the block alone
    if move_silu:
        _swap_class(proj, SiLULinear, state)
    _swap_class(block.norm1, FusedGroupNormSiLU, state)
    _swap_class(block.norm2, FusedGroupNormSiLU, state)
    _set_attr(block, "nonlinearity", nn.Identity(), state)
    return 2


def _fuse_norm_out(owner: nn.Module, state: _Acceleration) -> int:
    norm, act = getattr(owner, "conv_norm_out", None), getattr(owner, "conv_act", None)
    if type(norm) is not nn.GroupNorm or type(act) is not nn.SiLU:
        return 0
    _swap_class(norm, FusedGroupNormSiLU, state)
    _set_attr(owner, "conv_act", nn.Identity(), state)
    return 1


def _fuse_sequential(seq: nn.Sequential, state: _Acceleration) -> int:
    names = list(seq._modules)
    fused = 0
    for a, b in itertools.pairwise(names):
        norm, act = seq._modules[a], seq._modules[b]
        if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
            _swap_class(norm, FusedGroupNormSiLU, state)
            _set_attr(seq, b, nn.Identity(), state)
            fused += 1
    return fused


def _fuse_norms(module: nn.Module, state: _Acceleration) -> int:
    if isinstance(module, nn.Sequential):
        return _fuse_sequential(module, state)
    if not is_diffusers_object(module):
        return 0
    name = type(module).__name__
    if name == "ResnetBlock2D":
        return _fuse_resnet(module, state)
    if name in _NORM_OUT_OWNERS:
        return _fuse_norm_out(module, state)
    return 0


def _patch_attention(module: nn.Module, attention_class: type, state: _Acceleration) -> int:
    if not isinstance(module, attention_class):
        return 0
    processor = getattr(module, "processor", None)
    if type(processor).__name__ not in _DEFAULT_PROCESSORS or not is_diffusers_object(processor):
        return 0  # custom processors (IP-adapter, LoRA, added-KV, ...) stay as they are
    if getattr(module, "added_kv_proj_dim", None) is not None or module.to_k is None or module.to_out is None:
        return 0
    state.patches.append(_Patch("processor", module, None, processor))
    module.set_processor(FastdiffAttnProcessor(processor))
    return 1


def _swap_scheduler(pipe: Any, state: _Acceleration) -> int:
    from fastdiff import schedulers

    scheduler = getattr(pipe, "scheduler", None)
    name = type(scheduler).__name__
    ours_class = getattr(schedulers, name, None)
    if (scheduler is None or not is_diffusers_object(scheduler) or not isinstance(ours_class, type)
            or not issubclass(ours_class, schedulers.Scheduler)):
        return 0
    try:
        ours = ours_class.from_config(scheduler.config)
    except (ValueError, TypeError) as exc:
        logger.info("fastdiff.accelerate: keeping diffusers' %s (%s)", name, exc)
        return 0
    _set_attr(pipe, "scheduler", ours, state)
    return 1


def _roots(obj: Any) -> tuple[list[nn.Module], bool]:
    """(the modules to walk, whether obj is a pipeline with a scheduler slot)."""
    if isinstance(obj, nn.Module):
        return [obj], False
    components = getattr(obj, "components", None)
    if is_diffusers_object(obj) and isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, nn.Module)], True
    modules = getattr(obj, "modules", None)
    if callable(modules) and hasattr(obj, "scheduler"):  # a fastdiff Pipeline (already fused: usually nothing to do)
        found = modules()
        if isinstance(found, dict):
            return list(found.values()), False
    raise TypeError(f"fastdiff.accelerate takes an nn.Module or a diffusers pipeline, got {type(obj).__name__}")


# --------------------------------------------------------------------------------------------- public API
def accelerate(obj, *, group_norm_silu: bool = True, attention: bool = True, scheduler: bool = True):
    """Patch ``obj`` (an nn.Module, e.g. a diffusers UNet2DModel / UNet2DConditionModel / AutoencoderKL, or a
    diffusers pipeline, all of whose nn.Module components are patched) in place to run through fastdiff's fused ops.

    Keyword flags switch off one kind of replacement. Returns ``obj`` itself. What was replaced is logged in one line
    and returned by :func:`accelerate_report`. Calling it again on an accelerated object does nothing; modules a
    previous call patched (e.g. ``accelerate(pipe.unet)`` before ``accelerate(pipe)``) are skipped.

    Raises TypeError for other objects, ImportError (naming the extra) for a diffusers object without diffusers.
    """
    roots, is_pipeline = _roots(obj)
    if getattr(obj, _STATE, None) is not None:
        logger.info("fastdiff.accelerate(%s): already accelerated", type(obj).__name__)
        return obj
    modules = list({id(m): m for root in roots for m in root.modules()}.values())
    attention_class = None
    if is_diffusers_object(obj) or any(is_diffusers_object(m) for m in modules):
        require_diffusers(f"fastdiff.accelerate({type(obj).__name__})")
        from diffusers.models.attention_processor import Attention

        attention_class = Attention
    state = _Acceleration()
    for module in modules:
        if group_norm_silu:
            state.counts["group_norm_silu"] += _fuse_norms(module, state)
        if attention and attention_class is not None:
            state.counts["attention"] += _patch_attention(module, attention_class, state)
    if scheduler and is_pipeline:
        state.counts["scheduler"] += _swap_scheduler(obj, state)
    object.__setattr__(obj, _STATE, state)  # a plain attribute (bypasses diffusers' pipeline config bookkeeping)
    logger.info("fastdiff.accelerate(%s): replaced %s", type(obj).__name__,
                ", ".join(f"{k}={v}" for k, v in state.counts.items()))
    return obj


def accelerate_report(obj) -> dict[str, int] | None:
    """What :func:`accelerate` replaced in ``obj``: ``{"group_norm_silu": n, "attention": n, "scheduler": n}``, or
    None when ``obj`` is not accelerated (never, or restored since)."""
    state = getattr(obj, _STATE, None)
    return dict(state.counts) if state is not None else None


def restore(obj):
    """Undo :func:`accelerate` on ``obj`` exactly (classes, modules, processors and the scheduler put back, in reverse
    order); returns ``obj``. State-dict keys and values never changed; a non-accelerated object is returned as is."""
    state = getattr(obj, _STATE, None)
    if state is None:
        return obj
    for patch in reversed(state.patches):
        if patch.kind == "class":
            patch.owner.__class__ = patch.original
        elif patch.kind == "attr":
            setattr(patch.owner, patch.name, patch.original)
        else:
            patch.owner.set_processor(patch.original)
    object.__delattr__(obj, _STATE)
    logger.info("fastdiff.restore(%s): put back %d replacement(s)", type(obj).__name__, len(state.patches))
    return obj
