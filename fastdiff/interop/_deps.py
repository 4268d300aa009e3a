"""diffusers is optional: import it only inside the functions that need it, with an error that names the extra."""

from __future__ import annotations

from typing import Any

EXTRA_HINT = "pip install 'fastdiff[diffusers]'"


def require_diffusers(what: str):
    """``import diffusers`` for ``what``; ImportError naming the extra when it is not installed."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"{what} needs the diffusers package, which is not installed: {EXTRA_HINT}") from exc
    return diffusers


def is_diffusers_object(obj: Any) -> bool:
    """True when ``obj``'s class (or a base class) is defined in the diffusers package (no import of diffusers)."""
    return any(cls.__module__.split(".", 1)[0] == "diffusers" for cls in type(obj).__mro__)


def diffusers_class_name(obj: Any, names) -> str | None:
    """The first class name in ``obj``'s MRO that is a diffusers class listed in ``names`` (subclasses of a supported
    diffusers class convert as that class), or None."""
    for cls in type(obj).__mro__:
        if cls.__module__.split(".", 1)[0] == "diffusers" and cls.__name__ in names:
            return cls.__name__
    return None
