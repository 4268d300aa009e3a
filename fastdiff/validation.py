"""The one home of input validation and of the vocabularies the layers share.

Every public function of fastdiff (ops, schedulers, pipelines, models, the command, generate) checks its arguments
with these helpers before doing any work, with one convention: a wrong type raises ``TypeError``, a wrong value
``ValueError``, and both name the argument (as the caller spells it: ``batch_size``, ``--num``). numpy scalars count
as numbers (and the checks return them as plain Python int / float / bool, which is what a config must store to be
written as JSON); bools never count as numbers. This module imports nothing from fastdiff, so the Triton kernels (the
lowest layer) can share its vocabularies too.

The one exception is in the diffusers-compatible scheduler API: ``set_timesteps`` checks ``num_inference_steps``
with ``fastdiff.schedulers.schedules.check_num_inference_steps``, which raises ``ValueError`` for a wrong type as
well as a wrong value (e.g. ``set_timesteps(2.5)``), because diffusers' schedulers reject a bad
``num_inference_steps`` with ``ValueError`` and that is what code written for them catches. Everything else — the
pipelines' own ``num_inference_steps`` check included (``check_positive_int``: a float is a ``TypeError``) —
follows the convention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a diffusion model predicts (the order is the fused step kernels' code: epsilon 0, sample 1, v_prediction 2)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# The DDPM posterior variances the fused DDPM step implements (fixed_small 0, fixed_large 1)
VARIANCE_TYPES = ("fixed_small", "fixed_large")

_BOOLS = (bool, np.bool_)


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, _BOOLS):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (not a bool) in [minimum, maximum] (either bound optional), as a Python int."""
    if isinstance(value, _BOOLS) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        upper = f" and ≤ {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be ≥ {minimum}{upper}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be ≤ {maximum}, got {value}")
    return value


def check_positive_int(name: str, value, maximum: Optional[int] = None) -> int:
    """An integer ≥ 1 (and ≤ ``maximum`` when given)."""
    return check_int(name, value, 1, maximum)


def check_real(name: str, value, *, positive: bool = False, nonneg: bool = False,
               allow_none: bool = False) -> Optional[float]:
    """A finite real number (not a bool) as a float; ``positive``: > 0, ``nonneg``: ≥ 0; None passes with
    ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, _BOOLS) or not isinstance(value, numbers.Real):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be a real number{none}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    """A real number in [0, 1] (a probability, a decay, a mixing weight) as a float."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> Tensor:
    """A torch.Tensor whose dtype is in ``dtypes`` (None: any dtype)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_same_device(**tensors: Optional[Tensor]) -> None:
    """All the given tensors (None entries skipped) on one device, else ValueError naming the two that differ."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")


# --------------------------------------------------------------------------------------------- config dataclasses
def tuple_fields(config) -> None:
    """Turn list values of a config dataclass into tuples (as JSON gives them back), so configs compare equal."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


_FIELD_CHECKS = {int: check_int, float: check_real, bool: check_bool}
_FIELD_KINDS = {int: "an integer", float: "a real number", bool: "a bool"}


@functools.lru_cache(maxsize=None)
def _field_kinds(config_class: type) -> dict[str, tuple[Optional[type], bool, bool]]:
    """Field name → (scalar type in _FIELD_CHECKS or None, Optional, a ``tuple[scalar, ...]``) from the annotations."""
    hints = typing.get_type_hints(config_class)
    kinds = {}
    for f in dataclasses.fields(config_class):
        hint, optional = hints[f.name], False
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args and len(args) == 2:
            hint, optional = next(a for a in args if a is not type(None)), True
        is_tuple = typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,)
        scalar = typing.get_args(hint)[0] if is_tuple else hint
        kinds[f.name] = (scalar if scalar in _FIELD_CHECKS else None, optional, is_tuple)
    return kinds


def normalize_config(config) -> None:
    """Check the type of every int / float / bool field of a config dataclass (plain, ``Optional[...]`` or
    ``tuple[..., ...]`` as annotated) and store it back as the plain Python value: numpy scalars become int / float /
    bool, lists (and 1-D numpy arrays) become tuples. The config then writes to JSON and compares equal to what JSON
    gives back.

    TypeError names the field (``block_out_channels[1]`` for a tuple entry); value checks (positive, dividing, ...)
    are the config's own. Works on frozen dataclasses too (the values are stored with ``object.__setattr__``).
    """
    tuple_fields(config)
    for name, (scalar, optional, is_tuple) in _field_kinds(type(config)).items():
        value = getattr(config, name)
        if scalar is None or (optional and value is None):
            continue
        check = _FIELD_CHECKS[scalar]
        if is_tuple:
            if isinstance(value, np.ndarray) and value.ndim == 1:
                value = tuple(value.tolist())
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{name} must be a tuple of {scalar.__name__}s, got {type(value).__name__} {value!r}")
            value = tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
        else:
            try:
                value = check(name, value)
            except TypeError:
                if not optional:
                    raise
                raise TypeError(f"{name} must be {_FIELD_KINDS[scalar]} or None, got {type(value).__name__} "
                                f"{value!r}") from None
        object.__setattr__(config, name, value)
