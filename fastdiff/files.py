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


def _read_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status (since 4.7) without changing it; elsewhere it can
    only be read by setting it and setting it back — a moment in which a file another thread creates gets the
    wrong mode, which is why this runs once, at import, and never per write."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# Read once: write_atomic's writer-function path (a file it did not create) takes its mode from it.
_UMASK = _read_umask()


def temporary_name(path: PathLike) -> Path:
    """The temporary name :func:`write_atomic` writes ``path`` under first (in the same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s temporaries (left behind by a killed writer)."""
    return bool(_TEMP.match(name))


def write_atomic(path: PathLike, data: Union[bytes, Callable[[Path], None]], *, mode: int | None = None) -> Path:
    """Write ``path`` atomically. ``data``: the bytes, or a function that writes the file at the path it is given
    (for writers that want a path, such as safetensors' ``save_file``). ``mode``: permission bits, less the umask
    (default 0o666, what ``open`` gives). Returns ``path``; on any error the temporary file is removed.

    Bytes are written to a temporary file created with ``os.open(..., mode)``, so the kernel applies the current
    umask. A writer function creates the file itself (safetensors, for one, makes it 0o600), so it is chmod-ed to
    ``mode`` less the umask read once at import (never by set-and-restore per call: that races with threads).
    """
    path = Path(path)
    tmp = temporary_name(path)
    mode = 0o666 if mode is None else mode
    try:
        if tmp.exists():  # a stale temporary of this pid: O_CREAT would keep its old mode
            tmp.unlink()
        if callable(data):
            data(tmp)
            os.chmod(tmp, mode & ~_UMASK)
            with open(tmp, "rb") as f:  # fsync works on a read-only descriptor
                os.fsync(f.fileno())
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), mode)
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
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
