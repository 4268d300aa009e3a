"""diffusers pipeline folders → fastdiff pipelines, and fastdiff's pixel DiffusionPipeline → a diffusers pipeline.

A diffusers pipeline folder holds ``model_index.json`` (the pipeline class and one ``[library, class]`` entry per
component) and a subfolder per component. fastdiff reads the models with :func:`from_diffusers` (no diffusers
needed) and the scheduler with ``fastdiff.schedulers.<same class>.from_config(folder)``:

| components                     | fastdiff pipeline          | e.g. diffusers                          |
|--------------------------------|----------------------------|-----------------------------------------|
| unet + scheduler               | DiffusionPipeline          | DDPMPipeline, DDIMPipeline              |
| unet + vae + scheduler         | LatentDiffusionPipeline    | Stable Diffusion (text encoder ignored) |
| unet + vqvae + scheduler       | VQPipeline                 | LDMPipeline                             |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from fastdiff.files import read_json_object
from fastdiff.interop._deps import require_diffusers
from fastdiff.interop.diffusers_models import from_diffusers, model_to_diffusers

logger = logging.getLogger("fastdiff")

PathLike = str | os.PathLike
INDEX_NAME = "model_index.json"
MODEL_COMPONENTS = ("unet", "vae", "vqvae")
STEP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")  # the diffusers pipelines to_diffusers can build

__all__ = ["NullClassLabels", "pipeline_from_diffusers", "pipeline_to_diffusers"]


def _read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    index = read_json_object(path, missing=f"a diffusers pipeline folder holds {INDEX_NAME} and one subfolder per "
                                           f"component")
    if "_fastdiff_version" in index:
        raise ValueError(f"{path}: a fastdiff pipeline folder; load it with fastdiff.load or Pipeline.from_pretrained")
    return index


def pipeline_from_diffusers(path: PathLike, *, scheduler=None, ignore: Sequence[str] = (),
                            device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A fastdiff pipeline from a diffusers pipeline folder (``model_index.json`` + component subfolders); no
    diffusers needed.

    Args:
        path: the pipeline folder.
        scheduler: a scheduler to use instead of the folder's (needed when the folder's scheduler class has no
            fastdiff equivalent, e.g. PNDMScheduler).
        ignore: components to skip (e.g. ``("text_encoder", "tokenizer")`` of a Stable Diffusion folder: fastdiff's
            LatentDiffusionPipeline takes the text embeddings as ``context=``).
        device, dtype: as for :func:`fastdiff.from_diffusers`.
    Returns:
        DiffusionPipeline (unet + scheduler), LatentDiffusionPipeline (+ vae) or VQPipeline (+ vqvae), with
        ``sample_size`` from the unet's config.
    Raises:
        ValueError: a component fastdiff cannot load (listing what it can), an unknown scheduler class, a missing
            unet or scheduler. FileNotFoundError: missing files.
    """
    from fastdiff import schedulers as fs
    from fastdiff.pipelines import DiffusionPipeline, LatentDiffusionPipeline, VQPipeline

    folder = Path(path)
    index = _read_index(folder)
    where = folder / INDEX_NAME
    components = {k: v for k, v in index.items()
                  if not k.startswith("_") and k not in ignore and isinstance(v, (list, tuple))
                  and len(v) == 2 and v[1] is not None}
    unknown = sorted(set(components) - set(MODEL_COMPONENTS) - {"scheduler"})
    if unknown:
        raise ValueError(f"{where}: fastdiff cannot load the component(s) {unknown} "
                         f"({', '.join(f'{k}={components[k][1]}' for k in unknown)}); it loads unet, vae, vqvae and "
                         f"scheduler. Skip the others with ignore={tuple(unknown)!r} (a text encoder's embeddings go "
                         f"to the pipeline as context=)")
    if "unet" not in components:
        raise ValueError(f"{where}: no unet component; fastdiff's diffusion pipelines need unet and scheduler")
    if "vae" in components and "vqvae" in components:
        raise ValueError(f"{where}: both a vae and a vqvae; fastdiff pipelines take one of them")
    models = {name: from_diffusers(folder / name, device=device, dtype=dtype)
              for name in MODEL_COMPONENTS if name in components}
    if scheduler is None:
        if "scheduler" not in components:
            raise ValueError(f"{where}: no scheduler component; pass scheduler=")
        name = components["scheduler"][1]
        cls = getattr(fs, name, None)
        if not (isinstance(cls, type) and issubclass(cls, fs.Scheduler)):
            supported = sorted(n for n in fs.__all__ if n.endswith("Scheduler") and n != "Scheduler")
            raise ValueError(f"{where}: scheduler class {name!r} has no fastdiff equivalent (fastdiff has "
                             f"{', '.join(supported)}); pass scheduler= one of them")
        scheduler = cls.from_config(folder / "scheduler")
    unet_config = read_json_object(folder / "unet" / "config.json")
    sample_size = unet_config.get("sample_size")
    if sample_size is None:
        raise ValueError(f"{folder / 'unet' / 'config.json'}: no sample_size, so the image (latent) size is unknown")
    sample_size = tuple(sample_size) if isinstance(sample_size, list) else sample_size
    if "vqvae" in models:
        pipe = VQPipeline(models["vqvae"], models["unet"], scheduler, sample_size=sample_size)
    elif "vae" in models:
        pipe = LatentDiffusionPipeline(models["unet"], models["vae"], scheduler, sample_size=sample_size)
    else:
        pipe = DiffusionPipeline(models["unet"], scheduler, sample_size=sample_size)
    logger.info("fastdiff: loaded diffusers %s from %s as %s", index.get("_class_name"), folder, type(pipe).__name__)
    return pipe


class NullClassLabels:
    """Forward pre-hook for a class-conditional diffusers UNet: when no ``class_labels`` are passed, pass fastdiff's
    null (unconditional) class, as a fastdiff UNet does. diffusers' UNet2DModel otherwise raises without labels, and
    its DDIMPipeline / DDPMPipeline never pass any."""

    def __init__(self, null_class: int):
        self.null_class = null_class

    def __call__(self, module, args, kwargs):
        if len(args) >= 3 or kwargs.get("class_labels") is not None:
            return None
        sample = args[0] if args else kwargs["sample"]
        kwargs = dict(kwargs, class_labels=torch.full((sample.shape[0],), self.null_class, dtype=torch.long,
                                                      device=sample.device))
        return args, kwargs


def pipeline_to_diffusers(pipe):
    """A diffusers DDIMPipeline / DDPMPipeline equivalent to a fastdiff pixel-space DiffusionPipeline with a DDIM /
    DDPM scheduler: the UNet converted with the same weights, and diffusers' scheduler of the same class built from
    our scheduler's config. For a class-conditional UNet a :class:`NullClassLabels` forward pre-hook on the diffusers
    UNet supplies the null class (diffusers' pipelines pass no labels), so the diffusers pipeline samples
    unconditionally, as ``pipe(class_labels=None)`` does. Raises ValueError for other pipelines or schedulers."""
    from fastdiff.pipelines import DiffusionPipeline

    diffusers = require_diffusers("fastdiff.to_diffusers")
    if type(pipe) is not DiffusionPipeline:
        raise ValueError(f"fastdiff.to_diffusers converts a pixel-space DiffusionPipeline (→ diffusers DDIMPipeline / "
                         f"DDPMPipeline) and UNet/AutoencoderKL/VQVAE models; got a {type(pipe).__name__}")
    name = type(pipe.scheduler).__name__
    if name not in STEP_SCHEDULERS:
        raise ValueError(f"fastdiff.to_diffusers builds a diffusers DDIMPipeline or DDPMPipeline, so the scheduler "
                         f"must be one of {STEP_SCHEDULERS}; this pipeline has a {name}")
    unet = model_to_diffusers(pipe.unet, sample_size=pipe.settings["sample_size"])
    scheduler = getattr(diffusers, name).from_config(dict(pipe.scheduler.config))
    if pipe.unet.config.num_classes is not None:
        unet.register_forward_pre_hook(NullClassLabels(pipe.unet.null_class), with_kwargs=True)
    pipeline_class = diffusers.DDIMPipeline if name == "DDIMScheduler" else diffusers.DDPMPipeline
    return pipeline_class(unet=unet, scheduler=scheduler)
