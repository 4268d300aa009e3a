"""The models that ship inside the package, by name: ``fastdiff.list_models()`` and ``fastdiff.load(name)``.

Each shipped model is a pipeline folder under ``fastdiff/assets/<name>/`` (``model_index.json``, one subfolder per
component, ``MODEL_CARD.md``). Nothing is downloaded: a name that is not shipped is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "digits-ddpm"


def list_models() -> list[str]:
    """Names of the models shipped in the package, sorted."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model_index.json").is_file())


def model_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """The folder of a shipped model name, or ``name_or_path`` itself if it is a pipeline folder."""
    path = Path(name_or_path)
    if (path / "model_index.json").is_file():
        return path
    name = str(name_or_path)
    if name in list_models():
        return ASSETS / name
    raise ValueError(f"unknown model {name!r}: not a shipped model ({', '.join(list_models()) or 'none'}) "
                     f"nor a pipeline folder with model_index.json")


def model_settings(name_or_path: Union[str, os.PathLike]) -> dict:
    """The pipeline settings saved with a model (e.g. sample_size, default guidance and steps)."""
    index = json.loads((model_path(name_or_path) / "model_index.json").read_text(encoding="utf-8"))
    return dict(index.get("settings", {}))


def load(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, device: Union[str, torch.device, None] = None,
         dtype: Optional[torch.dtype] = None):
    """The ready pipeline of a shipped model (see :func:`list_models`) or of a saved pipeline folder.

    Example: ``fastdiff.load("digits-ddpm")(batch_size=16, class_labels=[3] * 16, num_inference_steps=25,
    guidance_scale=3.0, output_type="np")``. Raises ValueError for an unknown name.
    """
    from fastdiff.pipelines import load_pipeline

    return load_pipeline(model_path(name_or_path), device=device, dtype=dtype)
