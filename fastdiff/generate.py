"""``fastdiff generate``: many images into a folder, sharded over torch.distributed ranks, resumable.

    fastdiff generate --model digits-ddpm --num 50000 --outdir out/ --batch 256
    torchrun --nproc_per_node=8 -m fastdiff -- generate --model digits-ddpm --num 50000 --outdir out/ --batch 256

(The "--" keeps torchrun's own parser from reading ``--num`` as an abbreviation of its ``--numa-binding``.)

**Which image is which.** Image i is made from its own CPU ``torch.Generator`` seeded with :func:`image_seed` (S, i)
(a numpy ``SeedSequence(S, spawn_key=(i,))``, a stable algorithm), and the pipelines draw each row's noise — the
initial x_T and the noise of stochastic samplers (DDPM, Euler ancestral, DDIM with η > 0) at every step — from that
row's generator; class-conditional models get class i mod num_classes. So image i is the same sample whatever the
number of ranks or the batch size. Bit for bit: BLAS/oneDNN pick their kernels by tensor shape, so the same row
computed in batches of different sizes can differ in the last float32 bits. On the CPU the pipeline therefore runs
under :func:`fastdiff.batch_invariant` (linear layers and matrix products on fastdiff's own CPU GEMM, one FMA chain
per element; convolutions in fixed chunks of rows), and the files are byte-identical for any ``--batch``, thread count
and number of ranks on one machine and CPU code path (tested: batch 1, 3, 5, 8, 12 and 20; 1 process vs 2 under
torchrun; 1 vs 2 threads; under every ATen/oneDNN/native ISA cap the test machine supports). The manifest records the
code path (:func:`fastdiff.batch_invariance.cpu_code_path`) and a resumed run on another one is warned about.
On CUDA the mode is off by default (``--batch-invariant`` turns it on; cuBLAS/cuDNN invariance is not verified
there): files are then identical across ranks at the same ``--batch``, which every call
keeps fixed (min(batch, num) rows, a rank's last call padded with throw-away rows). The manifest records the batch and
the mode; a resumed run with another one is allowed and warned about.

**Files.** One per image: ``outdir/000123.png`` (8-bit grayscale, RGB or RGBA) or ``outdir/000123.npz`` (``image``:
the unquantised float32 (H, W, C) output in [0, 1]; ``index``; ``class_label`` for class-conditional models). One file
per image, not per batch, so neither ``--batch`` nor the number of ranks changes the folder, and a resumed run knows
exactly which images are missing. Each file is written under a temporary name in the same folder
(``.000123.png.<pid>.tmp``, :func:`fastdiff.files.write_atomic`), fsynced and renamed with ``os.replace``: a final
name always holds a complete file.

**Resuming.** Rerunning the same command skips the finished indices (left-over temporaries are deleted) and makes
the rest. ``outdir/manifest.json``, written atomically by rank 0 before any image, records the model (and a digest of
its files), sampler, steps, seed, guidance, classes, count, format and fastdiff version; a rerun whose settings differ
(the batch size and the number of ranks are not settings) is refused with a ValueError (CLI: one line, exit code 2;
under torchrun every rank prints it and torchrun itself exits with 1).

**Ranks.** Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT set) each process joins a process
group — NCCL on GPUs (rank r uses cuda:LOCAL_RANK), gloo on the CPU — unless one is already initialised, in which case
it is used and left alone. Rank 0 checks the folder and writes the manifest, then broadcasts the missing indices;
rank r makes missing[r::world]. Rank 0 shows one progress bar for the whole job (the images made by all ranks, summed
with an all_reduce per batch). The output folder must be on a file system every rank sees.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastdiff import batch_invariance, files, hub
from fastdiff._version import __version__
from fastdiff.validation import check_int, check_real

logger = logging.getLogger("fastdiff")

FORMATS = ("png", "npz")
MANIFEST = "manifest.json"
SEEDING = "torch.Generator('cpu').manual_seed(numpy.random.SeedSequence(seed, spawn_key=(index,))" \
          ".generate_state(1, numpy.uint64)[0])"
# the manifest entries a rerun must match (the model by the digest of its files, wherever the folder is)
COMPARED = ("model_digest", "pipeline", "sampler", "steps", "seed", "guidance", "num_classes", "count", "format",
            "seeding")
_IMAGE_NAME = re.compile(r"^(\d{6,})\.(png|npz)$")
_TEMP_NAME = re.compile(r"^\.(\d{6,}\.(png|npz)|" + re.escape(MANIFEST) + r")\.\d+\.tmp$")


# --------------------------------------------------------------------------------------------- seeds
def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image ``index`` of a job with seed ``seed`` (SeedSequence(seed, spawn_key=(index,)))."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, dtype=np.uint64)[0])


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator image ``index`` is drawn with: ``pipe(batch_size=1, generator=[image_generator(S, i)], ...)``
    remakes that one image (with class i mod num_classes for a class-conditional model)."""
    return torch.Generator("cpu").manual_seed(image_seed(seed, index))


def image_name(index: int, num: int, fmt: str) -> str:
    """``000123.png``: zero-padded to 6 digits, or to the digits of num − 1 if more."""
    return f"{index:0{max(6, len(str(num - 1)))}d}.{fmt}"


# --------------------------------------------------------------------------------------------- checks
def _check_outdir(outdir: Path) -> None:
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


def _model_digest(path: Path) -> str:
    """sha256 of the model folder's files (names, sizes, contents; model cards and hidden files left out)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.endswith(".md") or any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- files
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


def _prepare_outdir(outdir: Path, manifest: dict, model_path: Path) -> list[int]:
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

    manifest["model_digest"] = _model_digest(model_path)
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
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        files.write_atomic(path, text.encode("utf-8"))
        files.fsync_dir(outdir)
    for name in temps:
        try:
            (outdir / name).unlink()
        except FileNotFoundError:
            pass
    return [i for i in range(num) if i not in done]


# --------------------------------------------------------------------------------------------- ranks
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this call initialised the process group (and destroys it at the end)
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def gather(self, values: list[float]) -> list[list[float]]:
        if self.world == 1:
            return [values]
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t)
        return [o.tolist() for o in out]


def _resolve_device(device) -> torch.device:
    """The device this rank samples on: ``device`` (default cuda if present, else cpu); under torchrun a bare
    "cuda" means cuda:LOCAL_RANK."""
    dev = hub.resolve_device(None if device is None else str(device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(dev)
    return dev


def _init_distributed(device: torch.device) -> _Dist:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU), or use the one already initialised."""
    import torch.distributed as dist

    comm = device if device.type == "cuda" else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return _Dist(dist.get_rank(), dist.get_world_size(), False, comm)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return _Dist(dist.get_rank(), dist.get_world_size(), True, comm)


# --------------------------------------------------------------------------------------------- the job
def _resolve_job(pipe, model: str, steps: int | None, guidance: float | None) -> hub.SamplingDefaults:
    """The model's sampling defaults (:func:`fastdiff.hub.sampling_defaults`); ValueError for what generate cannot
    make: a VQ-VAE without a prior UNet, a model that needs a text context."""
    from fastdiff.pipelines import GANPipeline

    unet = getattr(pipe, "unet", None)
    if not isinstance(pipe, GANPipeline):
        if unet is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"--model {model!r} has no sampler (a VQ-VAE without a prior UNet): nothing to generate")
        if getattr(unet.config, "context_dim", None) is not None:
            raise ValueError(f"--model {model!r} needs a context (text) to sample; generate makes unconditional and "
                             f"class-conditional images")
    return hub.sampling_defaults(pipe, steps=steps, guidance=guidance, model=model)


def generate(model: str | os.PathLike, num: int, outdir: str | os.PathLike, batch: int = 256,
             sampler: str | None = None, steps: int | None = None, seed: int = 0, guidance: float | None = None,
             fmt: str = "png", device: str | torch.device | None = None, progress: bool = True,
             batch_invariant: bool | None = None) -> dict:
    """Make images 0 … num − 1 of a model into ``outdir``, one file each, sharded over the torch.distributed ranks.

    Args:
        model: a shipped model name (``fastdiff.list_models()``) or a pipeline folder.
        num: how many images (≥ 1); batch: images per pipeline call on each rank (≥ 1; the files do not depend on it
            when ``batch_invariant`` is on, see the module docstring).
        sampler: "ddpm", "ddim", "dpm++", "euler" or "euler-a" instead of the model's own; steps: sampler steps
            (default: the model's default_steps, else 25).
        seed: S ≥ 0; image i is drawn with :func:`image_generator` (S, i).
        guidance: classifier-free guidance scale (class-conditional models; default: the model's).
        fmt: "png" or "npz"; device: "cpu", "cuda" (cuda:LOCAL_RANK under torchrun) or None (cuda if present).
        progress: a progress bar on rank 0.
        batch_invariant: run the pipeline under :func:`fastdiff.batch_invariant` (None: on for the CPU, off for CUDA).
    Returns:
        this rank's summary: ``{"rank", "world", "outdir", "count", "new", "skipped", "seconds", "images_per_s",
        "per_rank": [images/s of each rank]}``.
    Raises:
        ValueError (TypeError for a non-number) naming the argument, before any image is made: bad numbers, unknown model or sampler, a file or an
        unwritable path as ``outdir``, an ``outdir`` made with other settings (see ``outdir/manifest.json``).
    """
    # 1. arguments (every rank, before anything starts)
    num = check_int("--num", num, 1)
    batch = check_int("--batch", batch, 1)
    seed = check_int("--seed", seed, 0)
    if seed >= 2**63:
        raise ValueError(f"--seed must be < 2**63, got {seed}")
    if steps is not None:
        steps = check_int("--steps", steps, 1)
    guidance = check_real("--guidance", guidance, allow_none=True)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if sampler is not None and sampler not in hub.SAMPLERS:
        raise ValueError(f"--sampler must be one of {sorted(hub.SAMPLERS)}, got {sampler!r}")
    path = hub.model_path(model)  # ValueError for an unknown name
    outdir = Path(outdir)
    _check_outdir(outdir)
    dev = _resolve_device(device)
    if batch_invariant is None:
        batch_invariant = dev.type == "cpu"
    elif not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool or None, got {batch_invariant!r}")

    dist = _init_distributed(dev)
    try:
        # 2. the pipeline and what it will be asked for (same on every rank)
        pipe = hub.load(path, sampler=sampler, device=dev)
        job = _resolve_job(pipe, str(model), steps, guidance)
        num_classes, steps, guidance = job.num_classes, job.steps, job.guidance
        scheduler = getattr(pipe, "scheduler", None)
        manifest = {
            "fastdiff_version": __version__,
            "model": str(model),
            "model_digest": None,  # filled in by rank 0
            "pipeline": type(pipe).__name__,
            "sampler": None if scheduler is None else type(scheduler).__name__,
            "steps": steps,
            "seed": seed,
            "guidance": guidance,
            "num_classes": num_classes,
            "class_labels": None if num_classes is None else "index mod num_classes",
            "count": num,
            "format": fmt,
            "batch": batch,  # not compared: recorded for the bit-exactness note above
            "batch_invariant": batch_invariant,  # not compared either
            # the CPU code path (ISA of ATen, oneDNN and fastdiff's extension, torch version): not compared, warned
            "cpu_code_path": batch_invariance.cpu_code_path() if dev.type == "cpu" else None,
            "file_names": f"{'N' * max(6, len(str(num - 1)))}.{fmt}",
            "seeding": SEEDING,
        }

        # 3. rank 0 checks the folder and writes the manifest; everyone gets its verdict and the missing indices
        verdict = None
        if dist.rank == 0:
            try:
                verdict = ("ok", _prepare_outdir(outdir, manifest, path))
            except (ValueError, OSError) as exc:
                verdict = ("error", str(exc))
        verdict = dist.broadcast(verdict)
        if verdict[0] == "error":
            raise ValueError(verdict[1])
        pending: list[int] = verdict[1]

        # 4. this rank's share, in rounds every rank takes part in (one all_reduce of the progress per round)
        mine = pending[dist.rank::dist.world]
        rounds = math.ceil(math.ceil(len(pending) / dist.world) / batch)
        rows_per_call = min(batch, num)  # the same for every rank and every call, whatever the number of ranks
        bar = None
        if progress and dist.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=num, initial=num - len(pending), unit="img", desc="generate", dynamic_ncols=True)
        start = time.perf_counter()
        busy = 0.0
        made = 0
        for r in range(rounds):
            chunk = mine[r * batch:(r + 1) * batch]
            if chunk:
                t0 = time.perf_counter()
                rows = chunk + chunk[-1:] * (rows_per_call - len(chunk))  # a fixed shape: padded, extra rows dropped
                kwargs = {"batch_size": len(rows), "generator": [image_generator(seed, i) for i in rows],
                          "output_type": "np", "progress": False, **job.call_kwargs()}
                if num_classes is not None:
                    kwargs["class_labels"] = job.class_labels(rows)
                with batch_invariance.batch_invariant(batch_invariant):
                    images = pipe(**kwargs)[:len(chunk)]  # (B, H, W, C) float32 in [0, 1]
                for index, image in zip(chunk, images):
                    if fmt == "png":
                        data = _encode_png(image)
                    else:
                        arrays = {"image": image, "index": np.int64(index)}
                        if num_classes is not None:
                            arrays["class_label"] = np.int64(index % num_classes)
                        data = _encode_npz(arrays)
                    files.write_atomic(outdir / image_name(index, num, fmt), data)
                    made += 1
                files.fsync_dir(outdir)
                busy += time.perf_counter() - t0
            done_now = dist.sum(len(chunk))
            if bar is not None:
                bar.update(done_now)
        if bar is not None:
            bar.close()

        # 5. the summary: images/s of each rank (its own busy time) and of the whole job (wall time)
        stats = dist.gather([float(made), busy, time.perf_counter() - start])
        total_new = int(sum(s[0] for s in stats))
        seconds = max(s[2] for s in stats)
        summary = {
            "rank": dist.rank, "world": dist.world, "outdir": str(outdir), "count": num, "new": total_new,
            "skipped": num - len(pending), "seconds": seconds,
            "images_per_s": total_new / seconds if seconds > 0 else 0.0,
            "per_rank": [s[0] / s[1] if s[1] > 0 else 0.0 for s in stats],
        }
        logger.info("%s", format_summary(summary))
        return summary
    finally:
        if dist.owned:
            torch.distributed.destroy_process_group()


def format_summary(summary: dict) -> str:
    """One line: images, seconds, images/s in total and per rank."""
    per_rank = ", ".join(f"{r:.1f}" for r in summary["per_rank"])
    return (f"generated {summary['new']} images into {summary['outdir']} ({summary['skipped']} already there, "
            f"{summary['count']} in all) in {summary['seconds']:.1f} s: {summary['images_per_s']:.1f} images/s total, "
            f"{summary['world']} rank(s) at {per_rank} images/s")


def main_from_args(args) -> int:
    """``fastdiff generate``: run :func:`generate` with the parsed arguments; rank 0 prints the summary."""
    summary = generate(args.model, args.num, args.outdir, batch=args.batch, sampler=args.sampler, steps=args.steps,
                       seed=args.seed, guidance=args.guidance, fmt=args.format, device=args.device,
                       progress=not getattr(args, "quiet", False),
                       batch_invariant=getattr(args, "batch_invariant", None))
    if summary["rank"] == 0:
        print(format_summary(summary), flush=True)
    return 0
