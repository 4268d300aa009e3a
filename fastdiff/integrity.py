"""Integrity of model folders: the sha256 of every weight file, recorded in the folder's ``checksums.json`` when the
folder is made (``fastdiff train``, so every shipped model has one) and checked when it is loaded.

``checksums.json``::

    {"algorithm": "sha256", "files": {"unet/model.safetensors": {"sha256": "9f2c…", "size": 1234567}, …}}

:func:`verify_folder` compares each listed file's size and sha256 (and that no weight file is missing from the list),
hashing each file once per process: a file already verified is not read again while its size and modification time
stay the same. A mismatch raises :class:`CorruptedModelError` (a ValueError) naming the file, the recorded and the
found digest. ``fastdiff info --verify`` checks every shipped folder (:func:`verify_assets`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from fastdiff.files import read_json_object, write_json_atomic

__all__ = ["CHECKSUMS", "CorruptedModelError", "file_sha256", "verify_assets", "verify_folder", "weight_files",
           "write_checksums"]

CHECKSUMS = "checksums.json"
WEIGHT_SUFFIXES = (".safetensors",)
PathLike = Union[str, os.PathLike]

# (resolved path, size, mtime_ns) → sha256 of the files hashed in this process
_HASHED: dict[tuple[str, int, int], str] = {}


class CorruptedModelError(ValueError):
    """A weight file of a model folder differs from its recorded sha256 or size, is missing, or is not recorded."""


def weight_files(folder: PathLike) -> list[Path]:
    """The weight files under ``folder`` (``*.safetensors``, hidden files and folders left out), sorted."""
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).parts
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in rel):
            found.append(path)
    return sorted(found)


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks; cached by (path, size, mtime) in this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _HASHED.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = _HASHED[key] = h.hexdigest()
    return digest


def write_checksums(folder: PathLike) -> Path:
    """Record the sha256 and size of every weight file under ``folder`` in ``folder/checksums.json`` (atomically).
    Returns its path."""
    folder = Path(folder)
    entries = {p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
               for p in weight_files(folder)}
    path = folder / CHECKSUMS
    write_json_atomic(path, {"algorithm": "sha256", "files": entries}, sort_keys=True)
    return path


def _reinstall_hint(folder: Path) -> str:
    from fastdiff.assets import ASSETS

    try:
        folder.resolve().relative_to(ASSETS.resolve())
    except ValueError:
        return "the folder's files were changed or damaged since they were recorded (retrain or restore it)"
    return "the fastdiff install is damaged: reinstall it (pip install --force-reinstall fastdiff)"


def verify_folder(folder: PathLike, required: bool = False) -> list[str]:
    """Check the weight files of ``folder`` against its ``checksums.json``; returns the files checked (relative
    paths). Without a ``checksums.json``: nothing to check ([]), or with ``required`` a CorruptedModelError.

    Raises :class:`CorruptedModelError` naming the file: a recorded file missing or of another size or sha256, a
    weight file not recorded, or an unreadable ``checksums.json``."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        if required:
            raise CorruptedModelError(f"{folder}: no {CHECKSUMS} (the sha256 of its weight files): "
                                      f"{_reinstall_hint(folder)}")
        return []
    try:
        record = read_json_object(path)
    except (OSError, ValueError) as exc:
        raise CorruptedModelError(f"{path}: unreadable ({exc}): {_reinstall_hint(folder)}") from None
    entries = record.get("files")
    if record.get("algorithm", "sha256") != "sha256" or not isinstance(entries, dict):
        raise CorruptedModelError(f"{path}: expected {{\"algorithm\": \"sha256\", \"files\": {{...}}}}: "
                                  f"{_reinstall_hint(folder)}")
    for rel, entry in sorted(entries.items()):
        file = folder / rel
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CorruptedModelError(f"{path}: entry {rel!r} has no sha256: {_reinstall_hint(folder)}")
        if not file.is_file():
            raise CorruptedModelError(f"{file}: missing (recorded in {CHECKSUMS}): {_reinstall_hint(folder)}")
        size = file.stat().st_size
        if "size" in entry and size != entry["size"]:
            raise CorruptedModelError(f"{file}: {size} bytes, {entry['size']} recorded in {CHECKSUMS}: "
                                      f"{_reinstall_hint(folder)}")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise CorruptedModelError(f"{file}: sha256 {digest[:16]}… differs from the {entry['sha256'][:16]}… "
                                      f"recorded in {CHECKSUMS}: {_reinstall_hint(folder)}")
    unrecorded = [p.relative_to(folder).as_posix() for p in weight_files(folder)
                  if p.relative_to(folder).as_posix() not in entries]
    if unrecorded:
        raise CorruptedModelError(f"{folder}: weight file(s) {unrecorded} not recorded in {CHECKSUMS}: "
                                  f"{_reinstall_hint(folder)}")
    return sorted(entries)


def verify_assets() -> dict[str, Union[list[str], str]]:
    """Every shipped folder (the models and the classifier): name → the files verified, or the error message."""
    from fastdiff.assets import ASSETS

    report: dict[str, Union[list[str], str]] = {}
    for folder in sorted(p for p in ASSETS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            report[folder.name] = verify_folder(folder, required=True)
        except CorruptedModelError as exc:
            report[folder.name] = str(exc)
    return report
