"""The one way fastdiff writes a file (atomically) and reads its JSON and safetensors files (with clear errors).

Every file fastdiff writes — weights, model / scheduler / pipeline JSON, sample grids, generated images and
manifests, training metrics and model cards — goes through :func:`write_atomic`: the bytes go to a temporary name in
the same folder (``.NAME.<pid>.tmp``), are flushed and fsynced, and the temporary file is renamed onto the final
name with ``os.replace``. A reader (or a resumed run) therefore never sees a truncated file under a final name, and
an interrupted write leaves at most a ``.tmp`` file behind, which :func:`is_temporary` recognises.

Every config / index / manifest JSON fastdiff reads (its own checkpoints and pipeline folders, diffusers folders,
scheduler configs) goes through :func:`read_json_object`, and every safetensors file through
:func:`read_safetensors`: a missing file is a FileNotFoundError, a corrupt one a ValueError naming the path. This
module imports nothing from fastdiff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


def temporary_name(path: PathLike) -> Path:
    """The temporary name :func:`write_atomic` writes ``path`` under first (in the same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s temporaries (left behind by a killed writer)."""
    return bool(_TEMP.match(name))


def write_atomic(path: PathLike, data: Union[bytes, Callable[[Path], None]], *, mode: int | None = None) -> Path:
    """Write ``path`` atomically. ``data``: the bytes, or a function that writes the file at the path it is given
    (for writers that want a path, such as safetensors' ``save_file``). ``mode``: permission bits (default: what
    ``open`` gives under the umask). Returns ``path``; on any error the temporary file is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o666 if mode is None else mode) & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, *, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON with a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def fsync_dir(folder: PathLike) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: PathLike, *, missing: str = "", require: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``path``. FileNotFoundError when it is missing (``missing`` is appended to the message,
    e.g. what such a folder should hold); ValueError naming the path for invalid JSON, a non-object, or a missing
    string entry of ``require`` (e.g. ``("_class_name",)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing{'; ' + missing if missing else ''}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    for key in require:
        if not isinstance(value.get(key), str):
            raise ValueError(f"{path}: no {key!r} string entry")
    return value


def read_safetensors(path: PathLike, *, missing: str = "") -> dict:
    """The tensors of a safetensors file, on the CPU. FileNotFoundError when missing; ValueError naming the path for
    a corrupt or truncated file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing{'; ' + missing if missing else ''}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError (not a public class) for corrupt/truncated files
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
