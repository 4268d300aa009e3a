"""diffusers model checkpoints ⇄ fastdiff models: UNet2DModel, UNet2DConditionModel, ControlNetModel, AutoencoderKL,
VQModel.

fastdiff's models use diffusers' module and parameter names (see :mod:`fastdiff.models.blocks`), so a checkpoint
converts by mapping the *config* (:mod:`fastdiff.interop.diffusers_config`, by hand) and renaming one key pattern
(``to_out.0.`` ⇄ ``to_out.``). This module holds the rest: reading a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, a sharded or a ``.bin`` checkpoint) without diffusers installed, the
state-dict key mapping, and building the models (:func:`from_diffusers`, :func:`model_to_diffusers`); diffusers is
needed only to read or build diffusers model objects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fastdiff.files import read_json_object, read_safetensors
from fastdiff.interop._deps import diffusers_class_name, is_diffusers_object, require_diffusers
from fastdiff.interop.diffusers_config import SUPPORTED_MODELS, convert_config, diffusers_config

PathLike = str | os.PathLike

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"

__all__ = [
    "from_diffusers",
    "model_to_diffusers",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
]

# --------------------------------------------------------------------------------------------- state dicts
_DEPRECATED_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


def state_dict_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys → fastdiff keys: ``to_out.0.`` → ``to_out.``, and the pre-0.14 attention names
    (query/key/value/proj_attn, as diffusers itself converts them) → to_q/to_k/to_v/to_out."""
    out = {}
    for key, value in state.items():
        key = key.replace(".to_out.0.", ".to_out.")
        key = _DEPRECATED_ATTENTION.sub(lambda m: m.group(1) + _DEPRECATED_NAMES[m.group(2)] + ".", key)
        out[key] = value
    return out


def state_dict_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastdiff keys → diffusers keys (``to_out.`` → ``to_out.0.``)."""
    return {re.sub(r"\.to_out\.(weight|bias)$", r".to_out.0.\1", k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------- reading a folder
def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder {str(folder)!r} does not exist (or is not a folder)")
    path = folder / CONFIG_NAME
    hint = (" (this is a pipeline folder: use fastdiff.pipeline_from_diffusers, or pass subfolder='unet')"
            if (folder / "model_index.json").is_file() else "")
    holds = f"a diffusers model folder holds {CONFIG_NAME} and {WEIGHTS_STEM}.safetensors{hint}"
    config = read_json_object(path, require=("_class_name",), missing=holds)
    if "_fastdiff_version" in config:
        raise ValueError(f"{path}: a fastdiff checkpoint ({config['_class_name']}), not a diffusers one; load it with "
                         f"fastdiff.load_model")
    return config


def _read_weights(folder: Path, variant: str | None) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers folder: one safetensors file, a sharded one (index.json), or a .bin file."""
    stem = WEIGHTS_STEM + (f".{variant}" if variant else "")
    single, index, pickled = (folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json",
                              folder / f"{stem}.bin")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a safetensors index (no 'weight_map' object)")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / shard))
        return state
    if pickled.is_file():
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors vary
            raise ValueError(f"{pickled}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from exc
    raise FileNotFoundError(f"{folder}: no {single.name} (nor a sharded index or {pickled.name})")


# --------------------------------------------------------------------------------------------- diffusers → fastdiff
def from_diffusers(path_or_model: PathLike | nn.Module, *, subfolder: str | None = None,
                   variant: str | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None):
    """The fastdiff model equivalent to a diffusers model, with the same weights (copied).

    Args:
        path_or_model: a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a
            sharded / ``.bin`` checkpoint), read without diffusers; or a loaded diffusers ``UNet2DModel``,
            ``UNet2DConditionModel``, ``ControlNetModel``, ``AutoencoderKL`` or ``VQModel`` (needs diffusers).
        subfolder: a component folder inside ``path`` (e.g. ``"unet"`` of a pipeline folder).
        variant: the weights variant (``diffusion_pytorch_model.<variant>.safetensors``, e.g. "fp16").
        device: where to put the model (default: CPU).
        dtype: floating dtype; None keeps the checkpoint's (the diffusers model's) dtype when it has one.
    Returns:
        a fastdiff UNet, ControlNet, AutoencoderKL or VQVAE in eval mode. The UNet's output equals diffusers'
        ``.sample``, a ControlNet's (down, mid) residuals diffusers' ``(down_block_res_samples,
        mid_block_res_sample)`` for the same ``controlnet_cond`` (for
        ``class_labels``, fastdiff's ``num_classes`` is diffusers' ``num_class_embeds − 1``; for a
        ``time_cond_proj_dim`` UNet, fastdiff's ``guidance=w`` is diffusers'
        ``timestep_cond=fastdiff.models.blocks.guidance_embedding(w, time_cond_proj_dim)``).
    Raises:
        ValueError: an unsupported model class or option (listing what is supported), a corrupt file, or weights
            that do not match the config. FileNotFoundError: a missing folder or file. ImportError: a model object
            without diffusers installed. TypeError: anything else.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        folder = Path(path_or_model) / subfolder if subfolder else Path(path_or_model)
        config = _read_config(folder)
        class_name, where = config["_class_name"], str(folder / CONFIG_NAME)
        model_class, fd_config = convert_config(class_name, config, where)  # before any weight is read
        state = _read_weights(folder, variant)
        source_dtype = None
    elif isinstance(path_or_model, nn.Module):
        require_diffusers("fastdiff.from_diffusers(model)")
        class_name = diffusers_class_name(path_or_model, SUPPORTED_MODELS)
        if class_name is None:
            kind = "diffusers " if is_diffusers_object(path_or_model) else ""
            raise ValueError(f"path_or_model is a {kind}{type(path_or_model).__name__}; fastdiff converts diffusers "
                             f"{', '.join(SUPPORTED_MODELS)} (or a folder holding one)")
        where = f"diffusers {class_name}"
        model_class, fd_config = convert_config(class_name, path_or_model.config, where)
        state = path_or_model.state_dict()
        floating = {p.dtype for p in path_or_model.parameters() if p.is_floating_point()}
        source_dtype = floating.pop() if len(floating) == 1 else None
    else:
        raise TypeError(f"path_or_model must be a folder path or a diffusers model, got {type(path_or_model).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return _build(model_class, fd_config, state_dict_from_diffusers(state), where, dtype or source_dtype, device)


def _build(model_class, fd_config, state: dict, where: str, dtype, device):
    from fastdiff.models.modeling import load_validated

    return load_validated(model_class(fd_config), state, where, dtype, device)


# --------------------------------------------------------------------------------------------- fastdiff → diffusers
def model_to_diffusers(model, sample_size=None):
    """The diffusers model equivalent to a fastdiff UNet (→ UNet2DModel, or UNet2DConditionModel with a
    context_dim), ControlNet with a context_dim (→ ControlNetModel), AutoencoderKL (→ AutoencoderKL) or VQVAE (→
    VQModel; EMA statistics are not carried), with the same weights (copied), on the model's device and dtype, in
    eval mode."""
    diffusers = require_diffusers("fastdiff.to_diffusers")
    class_name, kwargs = diffusers_config(model, sample_size)
    theirs = getattr(diffusers, class_name)(**kwargs)
    param = next(model.parameters())
    theirs.to(device=param.device)
    if param.dtype != torch.float32:
        theirs.to(dtype=param.dtype)
    state = state_dict_to_diffusers(model.state_dict())
    if class_name == "VQModel":  # the EMA codebook statistics have no place in a VQModel
        state = {k: v for k, v in state.items() if k not in ("quantize.cluster_size", "quantize.embed_avg")}
    theirs.load_state_dict(state, strict=True)
    return theirs.eval()
