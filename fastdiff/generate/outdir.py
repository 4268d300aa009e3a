"""``fastdiff generate``'s output folder: file names, the manifest, encoding and writing one image file.

The folder holds one file per image (``000123.png`` or ``.npz``) and ``manifest.json``. :func:`prepare_outdir` (rank 0,
before any image) creates the folder, checks or writes the manifest, deletes left-over temporaries and returns the
indices still missing; :func:`write_image` writes one image atomically (:func:`fastdiff.files.write_atomic`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fastdiff import files

logger = logging.getLogger("fastdiff")

FORMATS = ("png", "npz")
MANIFEST = "manifest.json"
# the manifest entries a rerun must match (the model by the digest of its files, wherever the folder is)
COMPARED = ("model_digest", "pipeline", "sampler", "steps", "seed", "guidance", "num_classes", "count", "format",
            "seeding")
_IMAGE_NAME = re.compile(r"^(\d{6,})\.(png|npz)$")
_TEMP_NAME = re.compile(r"^\.(\d{6,}\.(png|npz)|" + re.escape(MANIFEST) + r")\.\d+\.tmp$")


def image_name(index: int, num: int, fmt: str) -> str:
    """``000123.png``: zero-padded to 6 digits, or to the digits of num − 1 if more."""
    return f"{index:0{max(6, len(str(num - 1)))}d}.{fmt}"


def check_outdir(outdir: Path) -> None:
    """Read-only checks every rank makes before anything starts: not a file, and creatable/writable."""
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"--outdir {str(outdir)!r} is a file, not a folder")
    ancestor = outdir
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--outdir {str(outdir)!r} cannot be created: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--outdir {str(outdir)!r} is not writable")


def model_digest(path: Path) -> str:
    """sha256 over the model folder's files: each one's name, size and sha256 (:func:`fastdiff.integrity.file_sha256`,
    so weights already verified on load are not read again); model cards and hidden files left out."""
    from fastdiff.integrity import file_sha256

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.endswith(".md") or any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{f.stat().st_size}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def _encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) float in [0, 1] → PNG bytes, quantised as the pipelines' "pil" output is."""
    from PIL import Image

    pixels = (image * 255).round().astype(np.uint8)
    if pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f"--format png needs 1, 3 or 4 channels, the model makes {pixels.shape[-1]}; use npz")
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def _encode_npz(arrays: dict) -> bytes:
    """An .npz (what np.load reads) with fixed zip timestamps, so the same arrays always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def prepare_outdir(outdir: Path, manifest: dict, model_path: Path) -> list[int]:
    """Rank 0, before any image: create the folder, check or write the manifest, delete left-over temporaries.
    Returns the indices still missing. Raises ValueError (folder unusable, other settings)."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--outdir {str(outdir)!r} cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastdiff-probe-", dir=outdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--outdir {str(outdir)!r} is not writable: {exc.strerror or exc}") from None

    num, fmt = manifest["count"], manifest["format"]
    done, images, temps = set(), 0, []
    with os.scandir(outdir) as entries:
        for e in entries:
            if _TEMP_NAME.match(e.name):
                temps.append(e.name)
            elif (m := _IMAGE_NAME.match(e.name)) and e.is_file():
                images += 1
                index = int(m.group(1))
                if m.group(2) == fmt and index < num and e.name == image_name(index, num, fmt) and e.stat().st_size:
                    done.add(index)

    manifest["model_digest"] = model_digest(model_path)
    path = outdir / MANIFEST
    if path.exists():
        try:
            old = files.read_json_object(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--outdir {str(outdir)!r}: unreadable {MANIFEST} ({exc}); use a new folder") from None
        diffs = [f"{k} {old.get(k)!r} there, {manifest[k]!r} now" for k in COMPARED if old.get(k) != manifest[k]]
        if diffs:
            raise ValueError(f"--outdir {str(outdir)!r} holds images made with other settings ({'; '.join(diffs)}); "
                             f"use another folder or the same settings")
        if bool(old.get("batch_invariant")) != manifest["batch_invariant"]:
            logger.warning("fastdiff: %s was started with batch_invariant=%s, continuing with %s: the rest may differ "
                           "from an uninterrupted run in the last bits", outdir, bool(old.get("batch_invariant")),
                           manifest["batch_invariant"])
        elif not manifest["batch_invariant"] and old.get("batch") != manifest["batch"]:
            logger.warning("fastdiff: %s was started with --batch %s, continuing with %s: the rest may differ from an "
                           "uninterrupted run in the last bits", outdir, old.get("batch"), manifest["batch"])
        old_path, new_path = old.get("cpu_code_path"), manifest["cpu_code_path"]
        if "cpu_code_path" in old and old_path != new_path:  # (folders from before fastdiff recorded it: silent)
            if isinstance(old_path, dict) and isinstance(new_path, dict):
                what = "; ".join(f"{k} {old_path.get(k)} there, {new_path.get(k)} now"
                                 for k in sorted(set(old_path) | set(new_path)) if old_path.get(k) != new_path.get(k))
            else:
                what = f"{old_path} there, {new_path} now"
            logger.warning("fastdiff: %s was started on another CPU code path (%s): the rest may differ from an "
                           "uninterrupted run in the last bits", outdir, what)
        if old.get("fastdiff_version") != manifest["fastdiff_version"]:
            logger.warning("fastdiff: %s was started with fastdiff %s, continuing with %s", outdir,
                           old.get("fastdiff_version"), manifest["fastdiff_version"])
    elif images:
        raise ValueError(f"--outdir {str(outdir)!r} already holds {images} image file(s) but no {MANIFEST}; "
                         f"use an empty or new folder")
    else:
        files.write_json_atomic(path, manifest, sort_keys=True)
        files.fsync_dir(outdir)
    for name in temps:
        try:
            (outdir / name).unlink()
        except FileNotFoundError:
            pass
    return [i for i in range(num) if i not in done]


def write_image(outdir: Path, index: int, num: int, fmt: str, image: np.ndarray, class_label: int | None) -> None:
    """Image ``index`` ((H, W, C) float32 in [0, 1]) as ``outdir/NNNNNN.fmt``, written atomically."""
    if fmt == "png":
        data = _encode_png(image)
    else:
        arrays = {"image": image, "index": np.int64(index)}
        if class_label is not None:
            arrays["class_label"] = np.int64(class_label)
        data = _encode_npz(arrays)
    files.write_atomic(outdir / image_name(index, num, fmt), data)
