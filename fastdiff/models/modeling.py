"""Checkpoints for fastdiff models: ``save_pretrained`` / ``from_pretrained`` / :func:`load_model`, and the registry.

A checkpoint is a folder with two files:

* ``config.json``: the model's config dataclass as JSON plus ``"_class_name"`` (which model class) and
  ``"_fastdiff_version"``;
* ``model.safetensors``: the state dict (parameters and persistent buffers).

Loading builds a fresh model from the config, reads and validates every tensor (names, shapes, dtype kinds) and
only then assigns them, so a bad checkpoint raises a ValueError / FileNotFoundError naming the file or tensor and
never leaves a half-loaded model behind. A floating tensor holding NaN or Inf is refused the same way (a damaged file
or a diverged training would otherwise surface later as a NaN image): pass ``allow_non_finite=True`` (or load inside
:func:`allow_non_finite_weights`) to load it anyway.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from fastdiff.files import read_json_object, read_safetensors, write_atomic, write_text_atomic
from fastdiff.validation import normalize_config, tuple_fields  # noqa: F401  (re-exported: models use them)

logger = logging.getLogger("fastdiff")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_HOLDS = f"a fastdiff checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
# whether loading accepts NaN/Inf weights (allow_non_finite_weights; the loaders' allow_non_finite argument)
_ALLOW_NON_FINITE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastdiff_allow_non_finite", default=False)


@contextlib.contextmanager
def allow_non_finite_weights(allow: Optional[bool] = True):
    """Within the block, checkpoints with NaN/Inf weights load (``allow=True``) or are refused (``False``, the
    default outside any block); ``None`` leaves the setting as it is. What the loaders' ``allow_non_finite``
    argument sets."""
    if allow is None:
        yield
        return
    token = _ALLOW_NON_FINITE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_NON_FINITE.reset(token)

__all__ = ["ModelMixin", "allow_non_finite_weights", "load_model", "register_model", "registered_models",
           "build_config", "tuple_fields", "normalize_config",
           "CONFIG_NAME", "WEIGHTS_NAME"]

_REGISTRY: dict[str, type["ModelMixin"]] = {}

PathLike = Union[str, os.PathLike]


def register_model(cls: type["ModelMixin"]) -> type["ModelMixin"]:
    """Make ``cls`` loadable by :func:`load_model` under its class name (ModelMixin subclasses register themselves)."""
    _REGISTRY[cls.__name__] = cls
    return cls


def registered_models() -> dict[str, type["ModelMixin"]]:
    """Class name → model class, for every model :func:`load_model` can build."""
    import fastdiff.models  # noqa: F401  (importing the package registers every model)

    return dict(_REGISTRY)


def build_config(config_class: type, config: Any, overrides: dict[str, Any]):
    """A config instance from ``config`` (an instance, a dict or None) updated by keyword ``overrides``.

    Raises TypeError for a config of the wrong type and ValueError for unknown keys.
    """
    if config is None:
        config = config_class()
    elif isinstance(config, dict):
        config = _config_from_dict(config_class, config, where="config")
    elif not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, a dict or None, got {type(config).__name__}")
    if overrides:
        names = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown {config_class.__name__} option(s) {unknown}; known: {sorted(names)}")
        config = dataclasses.replace(config, **overrides)
    return config


def _config_from_dict(config_class: type, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {config_class.__name__} key(s) {unknown}; known: {sorted(names)}")
    # JSON has no tuples: every list in a config is a tuple field.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: invalid {config_class.__name__}: {exc}") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist (or is not a folder)")
    return read_json_object(folder / CONFIG_NAME, missing=_HOLDS, require=("_class_name",))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, missing=_HOLDS)


class ModelMixin(nn.Module):
    """Base of every fastdiff model: a ``config`` dataclass, ``save_pretrained`` and ``from_pretrained``.

    Subclasses set ``config_class`` and call ``super().__init__()``; they register themselves for
    :func:`load_model` by class name.
    """

    config_class: ClassVar[Optional[type]] = None
    config: Any

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("config_class") is not None:
            register_model(cls)

    # ----------------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed).

        Each file is written to a temporary name first and then renamed, so an interrupted save never leaves a
        truncated file under the final name.
        """
        from safetensors.torch import save_file

        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_directory {str(folder)!r} exists and is not a folder")
        config = {"_class_name": type(self).__name__, "_fastdiff_version": _version(),
                  **dataclasses.asdict(self.config)}
        try:  # serialized before anything is written: a config JSON cannot hold fails with no file (or folder) made
            config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self.config).__name__} cannot be written as JSON ({exc}); config fields must be "
                            f"plain Python values") from exc
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": "pt", "fastdiff_class": type(self).__name__}
        folder.mkdir(parents=True, exist_ok=True)
        # weights first, then the config: a folder whose config.json is new always has the matching weights
        write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        write_text_atomic(folder / CONFIG_NAME, config_text)
        logger.info("fastdiff: saved %s (%d tensors) to %s", type(self).__name__, len(tensors), folder)

    # ----------------------------------------------------------------------------------------- load
    @classmethod
    def from_pretrained(cls, pretrained_model_path: PathLike, device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None, allow_non_finite: Optional[bool] = None):
        """Build the model from a folder written by :meth:`save_pretrained`.

        Args:
            pretrained_model_path: the checkpoint folder.
            device: where to put the model (default: CPU).
            dtype: floating dtype of the model; None keeps the stored dtype (when all floating tensors share one).
            allow_non_finite: True loads weights holding NaN/Inf (refused by default); None: as the surrounding
                :func:`allow_non_finite_weights` block says (refused outside one).
        Raises:
            FileNotFoundError: the folder, config.json or model.safetensors is missing.
            ValueError: invalid JSON or config, a checkpoint of another class, a corrupt safetensors file, missing or
                unexpected tensors, a shape/dtype mismatch, or NaN/Inf weights (the message names the file or tensor).
        """
        folder = Path(pretrained_model_path)
        values = _read_config(folder)
        name = values["_class_name"]
        if cls.config_class is None:  # called on ModelMixin itself: pick the class from the config
            return load_model(folder, device=device, dtype=dtype, allow_non_finite=allow_non_finite)
        if name != cls.__name__:
            raise ValueError(f"{folder / CONFIG_NAME}: the checkpoint holds a {name!r}, not a {cls.__name__!r}; "
                             f"load it with {name}.from_pretrained or fastdiff.load_model")
        with allow_non_finite_weights(allow_non_finite):
            return cls._load(folder, values, device, dtype)

    @classmethod
    def _load(cls, folder: Path, values: dict[str, Any], device, dtype):
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        config_values = {k: v for k, v in values.items() if not k.startswith("_")}
        config = _config_from_dict(cls.config_class, config_values, where=str(folder / CONFIG_NAME))
        weights_path = folder / WEIGHTS_NAME
        stored = _read_weights(weights_path)

        return load_validated(cls(config), stored, weights_path, dtype, device)


def load_validated(model: nn.Module, state: dict, where: PathLike, dtype=None, device=None) -> nn.Module:
    """Load ``state`` into a freshly built ``model`` only after every tensor is validated against it (names, shapes,
    dtype kinds; errors name ``where``). The model takes the stored floating dtype unless ``dtype`` is given, then
    moves to ``device``; returned in eval mode. NaN/Inf in a floating tensor is refused unless allowed
    (:func:`allow_non_finite_weights`)."""
    _validate_state(Path(where), state, model.state_dict(), check_finite=not _ALLOW_NON_FINITE.get())
    if dtype is None:
        floating = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = floating.pop() if len(floating) == 1 else None
    if dtype is not None:
        model.to(dtype=dtype)
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device=device)
    return model.eval()


def _validate_state(path: Path, stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                    check_finite: bool = True) -> None:
    """Every expected tensor present with its shape and dtype kind, nothing else, and (``check_finite``) no NaN/Inf in
    a floating one; raise ValueError naming the tensor otherwise."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_short(unexpected)}")
        raise ValueError(f"{path}: does not match the model built from {CONFIG_NAME}: " + "; ".join(parts))
    for name, ref in expected.items():
        t = stored[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point() or (not ref.is_floating_point() and t.dtype != ref.dtype):
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, the model expects {ref.dtype}")
        if check_finite and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                nan = int(torch.isnan(t).sum())
                raise ValueError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) of {t.numel()} ({nan} NaN, "
                                 f"{bad - nan} ±Inf): the checkpoint is damaged or its training diverged; pass "
                                 f"allow_non_finite=True to load it anyway")


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _version() -> str:
    from fastdiff._version import __version__

    return __version__


def load_model(path: PathLike, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
               allow_non_finite: Optional[bool] = None):
    """Load any fastdiff model saved with ``save_pretrained``; the class comes from ``config.json``
    (``allow_non_finite``: as :meth:`ModelMixin.from_pretrained`).

    Raises FileNotFoundError / ValueError as :meth:`ModelMixin.from_pretrained`, and ValueError naming the known
    classes when ``_class_name`` is not a fastdiff model.
    """
    folder = Path(path)
    values = _read_config(folder)
    name = values["_class_name"]
    models = registered_models()
    if name not in models:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown model class {name!r}; fastdiff models: {sorted(models)}")
    with allow_non_finite_weights(allow_non_finite):
        return models[name]._load(folder, values, device, dtype)
