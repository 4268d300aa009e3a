"""``fastdiff generate``'s job: which image is which (seeds), the arguments, and making this rank's share of the
missing images batch by batch (see :mod:`fastdiff.generate` for the whole story)."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff import batch_invariance, files, hub
from fastdiff._version import __version__
from fastdiff.generate import distributed, outdir as folder
from fastdiff.validation import check_int, check_real

logger = logging.getLogger("fastdiff")

SEEDING = "torch.Generator('cpu').manual_seed(numpy.random.SeedSequence(seed, spawn_key=(index,))" \
          ".generate_state(1, numpy.uint64)[0])"


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image ``index`` of a job with seed ``seed`` (SeedSequence(seed, spawn_key=(index,)))."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, dtype=np.uint64)[0])


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator image ``index`` is drawn with: ``pipe(batch_size=1, generator=[image_generator(S, i)], ...)``
    remakes that one image (with class i mod num_classes for a class-conditional model)."""
    return torch.Generator("cpu").manual_seed(image_seed(seed, index))


class WriteError(OSError):
    """An image file could not be written (a full disk, a lost mount): the message says which file, why, and that
    the folder is resumable (every file under a final name is whole)."""


@contextlib.contextmanager
def _stop_on_signals():
    """Within the block, SIGTERM and SIGINT do not kill the process: the first one is recorded (``state["signal"]``)
    and the job stops after the batch in progress is written; a second one acts as usual. Only in the main thread
    (elsewhere signals cannot be caught: the block does nothing)."""
    state: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {}

    def handler(signum, frame):
        if state["signal"] is not None:  # a second signal: the usual behaviour
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        state["signal"] = signum
        logger.warning("fastdiff: %s: finishing the batch in progress, then stopping (the folder stays resumable; "
                       "send it again to stop at once)", signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield state
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _resolve_job(pipe, model: str, steps: int | None, guidance: float | None) -> hub.SamplingDefaults:
    """The model's sampling defaults (:func:`fastdiff.hub.sampling_defaults`); ValueError for what generate cannot
    make: a VQ-VAE without a prior UNet, a model that needs a context it cannot be given (a text-to-image pipeline
    is sampled through its class-label prompts "0" … "9")."""
    from fastdiff.pipelines import GANPipeline

    unet = getattr(pipe, "unet", None)
    if not isinstance(pipe, GANPipeline):
        if unet is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"--model {model!r} has no sampler (a VQ-VAE without a prior UNet): nothing to generate")
        if getattr(unet.config, "context_dim", None) is not None and getattr(pipe, "label_prompts", None) is None:
            raise ValueError(f"--model {model!r} needs a context (text) to sample; generate makes unconditional, "
                             f"class-conditional and text-to-image (prompts \"0\" … \"9\") images")
    return hub.sampling_defaults(pipe, steps=steps, guidance=guidance, model=model)


def check_arguments(model, num, outdir, batch=256, sampler=None, steps=None, seed=0, guidance=None, fmt="png",
                    batch_invariant=None) -> dict:
    """Validate :func:`generate`'s arguments without starting anything (also what ``--nproc`` checks before it
    starts its workers). Returns them normalised, with ``path`` (the model folder); ValueError / TypeError naming
    the argument."""
    num = check_int("--num-images", num, 1)
    batch = check_int("--batch", batch, 1)
    seed = check_int("--seed", seed, 0)
    if seed >= 2**63:
        raise ValueError(f"--seed must be < 2**63, got {seed}")
    if steps is not None:
        steps = check_int("--steps", steps, 1)
    guidance = check_real("--guidance", guidance, allow_none=True)
    if fmt not in folder.FORMATS:
        raise ValueError(f"--format must be one of {list(folder.FORMATS)}, got {fmt!r}")
    if sampler is not None and sampler not in hub.SAMPLERS:
        raise ValueError(f"--sampler must be one of {sorted(hub.SAMPLERS)}, got {sampler!r}")
    if batch_invariant is not None and not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool or None, got {batch_invariant!r}")
    path = hub.model_path(model)  # ValueError for an unknown name
    outdir = Path(outdir)
    folder.check_outdir(outdir)
    return {"num": num, "batch": batch, "steps": steps, "seed": seed, "guidance": guidance, "path": path,
            "outdir": outdir}


def generate(model: str | os.PathLike, num: int, outdir: str | os.PathLike, batch: int = 256,
             sampler: str | None = None, steps: int | None = None, seed: int = 0, guidance: float | None = None,
             fmt: str = "png", device: str | torch.device | None = None, progress: bool = True,
             batch_invariant: bool | None = None) -> dict:
    """Make images 0 … num − 1 of a model into ``outdir``, one file each, sharded over the torch.distributed ranks.

    Args:
        model: a shipped model name (``fastdiff.list_models()``) or a pipeline folder.
        num: how many images (≥ 1); batch: images per pipeline call on each rank (≥ 1; the files do not depend on it
            when ``batch_invariant`` is on, see the module docstring).
        sampler: one of fastdiff.hub.SAMPLERS ("ddim", "dpm++", "dpm++-3m", "euler-a", ...) instead of the model's
            own; steps: sampler steps (default: the model's default_steps, else 25).
        seed: S ≥ 0; image i is drawn with :func:`image_generator` (S, i).
        guidance: classifier-free guidance scale (class- or text-conditional models; default: the model's).
        fmt: "png" or "npz"; device: "cpu", "cuda" (cuda:LOCAL_RANK under torchrun) or None (cuda if present).
        progress: a progress bar on rank 0.
        batch_invariant: run the pipeline under :func:`fastdiff.batch_invariant` (None: on for the CPU, off for CUDA).
    Returns:
        this rank's summary: ``{"rank", "world", "outdir", "count", "new", "skipped", "seconds", "images_per_s",
        "per_rank": [images/s of each rank], "failed": [indices of images with NaN/Inf, not written], "stopped_by":
        None or "SIGTERM" / "SIGINT"}``. SIGTERM or SIGINT (in the main thread) stops the job after the batch in
        progress is written (every rank at the same round); a second signal acts at once. An image
        with NaN/Inf (the pipeline's NonFiniteError, or non-finite pixels) is never written: its index is listed in
        ``failed`` and a rerun into the same folder makes it again.
    Raises:
        ValueError (TypeError for a wrong type) naming the argument, before any image is made: bad numbers, unknown
        model or sampler, a file or an unwritable path as ``outdir``, an ``outdir`` made with other settings (see
        ``outdir/manifest.json``) or an unreadable manifest (never overwritten).
        WriteError (an OSError) when an image file cannot be written (a full disk): no partial file is left and a
        rerun resumes.
    """
    # 1. arguments (every rank, before anything starts)
    args = check_arguments(model, num, outdir, batch, sampler, steps, seed, guidance, fmt, batch_invariant)
    num, batch, steps, seed, guidance, path, outdir = (args[k] for k in ("num", "batch", "steps", "seed", "guidance",
                                                                          "path", "outdir"))
    dev = distributed.resolve_device(device)
    if batch_invariant is None:
        batch_invariant = dev.type == "cpu"

    dist = distributed.init_distributed(dev)
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
                verdict = ("ok", folder.prepare_outdir(outdir, manifest, path))
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
        failed: list[int] = []  # indices whose image had NaN/Inf (not written)
        stopped = None  # the signal that stopped the job early (SIGTERM / SIGINT), or None
        with _stop_on_signals() as signals:
            for r in range(rounds):
                # every rank takes part in this sum each round: a signal on any rank stops all at the same round
                if dist.sum(0 if signals["signal"] is None else 1):
                    stopped = signals["signal"] or signal.SIGTERM
                    break
                chunk = mine[r * batch:(r + 1) * batch]
                if chunk:
                    t0 = time.perf_counter()
                    rows = chunk + chunk[-1:] * (rows_per_call - len(chunk))  # a fixed shape: padded, extras dropped
                    with batch_invariance.batch_invariant(batch_invariant):
                        images = _sample_rows(pipe, job, rows, seed, num_classes, len(chunk))
                    for index, image in zip(chunk, images):
                        if image is None or not np.isfinite(image).all():  # never written: recorded, remade next run
                            failed.append(index)
                            continue
                        label = None if num_classes is None else index % num_classes
                        _write(outdir, index, num, fmt, image, label, made)
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
        all_failed = sorted(i for rank_failed in dist.gather_objects(failed) for i in rank_failed)
        if all_failed:
            logger.warning("fastdiff: %d image(s) had NaN/Inf values and were not written (indices %s); a rerun "
                           "remakes them", len(all_failed), all_failed[:20])
        seconds = max(s[2] for s in stats)
        summary = {
            "rank": dist.rank, "world": dist.world, "outdir": str(outdir), "count": num, "new": total_new,
            "skipped": num - len(pending), "seconds": seconds,
            "images_per_s": total_new / seconds if seconds > 0 else 0.0,
            "per_rank": [s[0] / s[1] if s[1] > 0 else 0.0 for s in stats],
            "failed": all_failed,
            "stopped_by": None if stopped is None else signal.Signals(stopped).name,
        }
        logger.info("%s", format_summary(summary))
        return summary
    finally:
        if dist.owned:
            torch.distributed.destroy_process_group()


def _write(outdir: Path, index: int, num: int, fmt: str, image, label, made: int) -> None:
    """:func:`fastdiff.generate.outdir.write_image`, its OSError (a full disk, say) made a :class:`WriteError` that
    names the file and says the folder is resumable (the file was written under a temporary name, now removed)."""
    try:
        folder.write_image(outdir, index, num, fmt, image, label)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            why += " (the disk is full)"
        error = WriteError(f"--outdir {str(outdir)!r}: writing {folder.image_name(index, num, fmt)} failed: {why}; "
                           f"no partial file was left and the {made} new image(s) before it are complete: free space "
                           f"and rerun the same command to resume")
        error.errno = exc.errno
        raise error from None


def _sample_rows(pipe, job, rows: list[int], seed: int, num_classes, keep: int) -> list:
    """The images (H, W, C) float32 of image indices ``rows`` (one call: a fixed batch shape), the first ``keep``.
    When the call stops on NaN/Inf (NonFiniteError), each index is remade alone (in a batch of its own index
    repeated, the same shape) so the images that are finite are kept; an image that fails alone is None."""
    from fastdiff.pipelines.base import NonFiniteError

    def call(batch_rows):
        kwargs = {"batch_size": len(batch_rows), "generator": [image_generator(seed, i) for i in batch_rows],
                  "output_type": "np", "progress": False, **job.call_kwargs()}
        if num_classes is not None:
            kwargs["class_labels"] = job.class_labels(batch_rows)
        return pipe(**kwargs)

    try:
        return list(call(rows)[:keep])
    except NonFiniteError:
        images = []
        for index in rows[:keep]:
            try:
                images.append(call([index] * len(rows))[0])
            except NonFiniteError:
                images.append(None)
        return images


def format_summary(summary: dict) -> str:
    """One line: images, seconds, images/s in total and per rank (and the indices that failed, if any)."""
    per_rank = ", ".join(f"{r:.1f}" for r in summary["per_rank"])
    failed = summary.get("failed") or []
    return (f"generated {summary['new']} images into {summary['outdir']} ({summary['skipped']} already there, "
            f"{summary['count']} in all) in {summary['seconds']:.1f} s: {summary['images_per_s']:.1f} images/s total, "
            f"{summary['world']} rank(s) at {per_rank} images/s"
            + (f"; {len(failed)} failed with NaN/Inf and not written (indices "
               f"{', '.join(map(str, failed[:20]))}{', …' if len(failed) > 20 else ''}): rerun to remake them"
               if failed else "")
            + (f"; stopped early by {summary['stopped_by']}: rerun the same command to finish"
               if summary.get("stopped_by") else ""))




def worker(kwargs: dict) -> dict:
    """One worker of ``fastdiff generate --nproc N`` (started by :func:`fastdiff.generate.distributed.launch`): runs
    :func:`generate` and returns its summary, or ``{"error": message}`` for a ValueError / TypeError, which the
    launching process reports as the command's one-line error."""
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores, as torchrun's workers do
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    try:
        return generate(**kwargs)
    except (ValueError, TypeError) as exc:
        return {"error": str(exc)}
