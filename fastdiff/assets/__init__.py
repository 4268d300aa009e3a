"""Weights, configs and model cards of the shipped models (one pipeline folder per model): :data:`ASSETS` and
:func:`list_models` (re-exported by :mod:`fastdiff.hub`; here so that the pipelines can resolve a shipped base model
without importing the hub, which imports them)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def list_models() -> list[str]:
    """Names of the models shipped in the package, sorted."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model_index.json").is_file())
