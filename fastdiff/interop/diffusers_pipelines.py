"""diffusers pipeline folders → fastdiff pipelines; fastdiff's pixel DiffusionPipeline → a diffusers pipeline, and a
TextToImagePipeline → diffusers components (:class:`DiffusersTextComponents`) or a folder
(:func:`save_diffusers_folder`).

A diffusers pipeline folder holds ``model_index.json`` (the pipeline class and one ``[library, class]`` entry per
component) and a subfolder per component. fastdiff reads the models with :func:`from_diffusers` (no diffusers
needed) and the scheduler with ``fastdiff.schedulers.<same class>.from_config(folder)``:

| components                                     | fastdiff pipeline       | e.g. diffusers                          |
|------------------------------------------------|-------------------------|-----------------------------------------|
| unet + scheduler                               | DiffusionPipeline       | DDPMPipeline, DDIMPipeline              |
| unet + vae + scheduler                         | LatentDiffusionPipeline | Stable Diffusion (text encoder ignored) |
| the same + fastdiff text_encoder and tokenizer | TextToImagePipeline     | a :func:`save_diffusers_folder` folder  |
| unet + vqvae + scheduler                       | VQPipeline              | LDMPipeline                             |

**A text-to-image folder** (:func:`save_diffusers_folder`). diffusers' StableDiffusionPipeline needs a CLIP text
encoder and tokenizer (transformers), which cannot express fastdiff's word tokenizer and small text transformer, so
the folder is a diffusers pipeline folder with two fastdiff components::

    model_index.json   {"_class_name": "TextToImagePipeline", "_diffusers_version": ..., "_fastdiff_settings": {...},
                        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["fastdiff", "TextEncoder"],
                        "tokenizer": ["fastdiff", "WordTokenizer"]}
    unet/              diffusers UNet2DConditionModel (config.json, diffusion_pytorch_model.safetensors)
    vae/               diffusers AutoencoderKL (config.json, diffusion_pytorch_model.safetensors)
    scheduler/         diffusers scheduler (scheduler_config.json), the pipeline's scheduler class and config
    text_encoder/      fastdiff TextEncoder (config.json with _fastdiff_version, model.safetensors)
    tokenizer/         fastdiff WordTokenizer (tokenizer.json)

``fastdiff.pipeline_from_diffusers(folder)`` loads it back into a TextToImagePipeline (settings such as the default
steps and guidance from ``_fastdiff_settings``); diffusers loads the unet, vae and scheduler one by one, e.g.
``diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``,
``diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")``,
``diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")`` (``DiffusionPipeline.from_pretrained``
cannot: there is no diffusers TextToImagePipeline class); the prompt embeddings come from
``fastdiff.load_model(folder + "/text_encoder")`` and ``fastdiff.models.WordTokenizer.from_pretrained(folder +
"/tokenizer")`` (see :meth:`DiffusersTextComponents.encode_prompt`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdiff.files import read_json_object, write_json_atomic
from fastdiff.interop._deps import require_diffusers
from fastdiff.interop.diffusers_models import from_diffusers, model_to_diffusers

logger = logging.getLogger("fastdiff")

PathLike = str | os.PathLike
INDEX_NAME = "model_index.json"
MODEL_COMPONENTS = ("unet", "vae", "vqvae")
TEXT_COMPONENTS = {"text_encoder": "TextEncoder", "tokenizer": "WordTokenizer"}  # fastdiff's, in a diffusers folder
STEP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")  # the diffusers pipelines to_diffusers can build
SETTINGS_KEY = "_fastdiff_settings"  # the TextToImagePipeline's settings in a save_diffusers_folder model_index.json

__all__ = ["DiffusersTextComponents", "NullClassLabels", "pipeline_from_diffusers", "pipeline_to_diffusers",
           "save_diffusers_folder"]


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
        device, dtype: as for :func:`fastdiff.from_diffusers` (the text encoder too).
    Returns:
        DiffusionPipeline (unet + scheduler), LatentDiffusionPipeline (+ vae), TextToImagePipeline (+ vae + a
        fastdiff ``text_encoder`` and ``tokenizer``: a :func:`save_diffusers_folder` folder, its settings restored)
        or VQPipeline (+ vqvae), with ``sample_size`` from the unet's config.
    Raises:
        ValueError: a component fastdiff cannot load (listing what it can), an unknown scheduler class, a missing
            unet or scheduler, a fastdiff text_encoder without its tokenizer (or without a vae). FileNotFoundError:
            missing files.
    """
    from fastdiff import schedulers as fs
    from fastdiff.pipelines import DiffusionPipeline, LatentDiffusionPipeline, TextToImagePipeline, VQPipeline

    folder = Path(path)
    index = _read_index(folder)
    where = folder / INDEX_NAME
    components = {k: v for k, v in index.items()
                  if not k.startswith("_") and k not in ignore and isinstance(v, (list, tuple))
                  and len(v) == 2 and v[1] is not None}
    text = {k for k, cls in TEXT_COMPONENTS.items() if k in components and list(components[k]) == ["fastdiff", cls]}
    unknown = sorted(set(components) - set(MODEL_COMPONENTS) - {"scheduler"} - text)
    if unknown:
        raise ValueError(f"{where}: fastdiff cannot load the component(s) {unknown} "
                         f"({', '.join(f'{k}={components[k][1]}' for k in unknown)}); it loads unet, vae, vqvae, "
                         f"scheduler and fastdiff's own text_encoder/tokenizer. Skip the others with "
                         f"ignore={tuple(unknown)!r} (a text encoder's embeddings go to the pipeline as context=)")
    if "unet" not in components:
        raise ValueError(f"{where}: no unet component; fastdiff's diffusion pipelines need unet and scheduler")
    if "vae" in components and "vqvae" in components:
        raise ValueError(f"{where}: both a vae and a vqvae; fastdiff pipelines take one of them")
    if text and (len(text) != len(TEXT_COMPONENTS) or "vae" not in components):
        raise ValueError(f"{where}: a fastdiff text-to-image folder holds unet, vae, scheduler, text_encoder and "
                         f"tokenizer; this one has {sorted(components)} (skip the text components with "
                         f"ignore=('text_encoder', 'tokenizer'))")
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
    if text:
        from fastdiff.models import TextEncoder, WordTokenizer, load_model

        text_encoder = load_model(folder / "text_encoder", device=device, dtype=dtype)
        if not isinstance(text_encoder, TextEncoder):
            raise ValueError(f"{folder / 'text_encoder'}: holds a {type(text_encoder).__name__}, not a TextEncoder")
        tokenizer = WordTokenizer.from_pretrained(folder / "tokenizer")
        pipe = TextToImagePipeline(models["unet"], models["vae"], scheduler, text_encoder, tokenizer,
                                   sample_size=sample_size)
        settings = index.get(SETTINGS_KEY) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: {SETTINGS_KEY} must be a JSON object, got {type(settings).__name__}")
        pipe.settings.update({k: v for k, v in settings.items() if k != "sample_size"})  # the unet's config says
    elif "vqvae" in models:
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
    """The diffusers equivalent of a fastdiff pipeline, with the same weights (copied).

    * A pixel-space DiffusionPipeline with a DDIM / DDPM scheduler → a diffusers DDIMPipeline / DDPMPipeline: the
      UNet converted, and diffusers' scheduler of the same class built from our scheduler's config. For a
      class-conditional UNet a :class:`NullClassLabels` forward pre-hook on the diffusers UNet supplies the null class
      (diffusers' pipelines pass no labels), so the diffusers pipeline samples unconditionally, as
      ``pipe(class_labels=None)`` does.
    * A TextToImagePipeline → :class:`DiffusersTextComponents`: diffusers ``unet`` (UNet2DConditionModel), ``vae``
      (AutoencoderKL) and ``scheduler`` (diffusers' class of the same name and config, any class diffusers has), plus
      copies of fastdiff's ``text_encoder`` and ``tokenizer`` (no diffusers pipeline class can hold them; see that
      class for the sampling loop, and :func:`save_diffusers_folder` for a folder).

    Raises ImportError (naming the extra) without diffusers; ValueError for other pipelines or schedulers.
    """
    from fastdiff.pipelines import DiffusionPipeline, TextToImagePipeline

    diffusers = require_diffusers("fastdiff.to_diffusers")
    if isinstance(pipe, TextToImagePipeline):
        return _text_components(pipe, diffusers)
    if type(pipe) is not DiffusionPipeline:
        raise ValueError(f"fastdiff.to_diffusers converts a pixel-space DiffusionPipeline (→ diffusers DDIMPipeline / "
                         f"DDPMPipeline), a TextToImagePipeline (→ diffusers components) and UNet/AutoencoderKL/VQVAE "
                         f"models; got a {type(pipe).__name__}")
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


# --------------------------------------------------------------------------------------------- text-to-image
@dataclass
class DiffusersTextComponents:
    """A fastdiff TextToImagePipeline as diffusers objects (:func:`pipeline_to_diffusers`, ``fastdiff.to_diffusers``).

    Attributes:
        unet: diffusers ``UNet2DConditionModel`` (``cross_attention_dim`` = the text encoder's hidden size).
        vae: diffusers ``AutoencoderKL``.
        scheduler: the diffusers scheduler of the pipeline's scheduler class, with its config.
        text_encoder: a copy of fastdiff's :class:`~fastdiff.models.TextEncoder` (diffusers has no equivalent).
        tokenizer: a copy of fastdiff's :class:`~fastdiff.models.WordTokenizer`.
        settings: the pipeline's settings (``sample_size`` — the latent size —, ``default_steps``,
            ``default_guidance_scale``, ...).

    The pipeline's sampling loop with these objects (DDIM; CFG batched [negative; prompt] as the pipeline does)::

        c = fastdiff.to_diffusers(text_pipe)
        cond, uncond = c.encode_prompt(["a bold 7"]), c.encode_prompt([""])     # (B, M, d) float32
        c.scheduler.set_timesteps(25)
        latents = torch.randn(1, c.unet.config.in_channels, 8, 8) * c.scheduler.init_noise_sigma
        for t in c.scheduler.timesteps:
            x = c.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = c.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            latents = c.scheduler.step(eps_u + s * (eps_c - eps_u), t, latents).prev_sample
        images = c.vae.decode(latents / c.vae.config.scaling_factor).sample   # (B, C, H, W) in [-1, 1]

    (with a ``shift_factor`` the VAE decodes ``latents / scaling_factor + shift_factor``).
    """

    unet: Any
    vae: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    settings: dict = field(default_factory=dict)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str | Sequence[str]) -> Tensor:
        """The text encoder's ``last_hidden_state`` of ``prompt`` (a str or a list of B str): (B, max_length,
        hidden_size) on the text encoder's device and dtype: diffusers' ``encoder_hidden_states``, as the fastdiff
        pipeline's :meth:`~fastdiff.pipelines.TextToImagePipeline.encode_prompt` computes them."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(prompts)
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return out.last_hidden_state

    def save_pretrained(self, save_directory: PathLike) -> Path:
        """Write the folder described in this module's docstring (unet/, vae/, scheduler/ by diffusers'
        ``save_pretrained``; text_encoder/, tokenizer/ in fastdiff's format; ``model_index.json`` last, so a
        folder without it is incomplete). Returns the folder. ValueError when it exists and is not a folder."""
        import diffusers

        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_directory {str(folder)!r} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        index = {"_class_name": "TextToImagePipeline", "_diffusers_version": diffusers.__version__,
                 SETTINGS_KEY: self.settings,
                 "unet": ["diffusers", type(self.unet).__name__], "vae": ["diffusers", type(self.vae).__name__],
                 "scheduler": ["diffusers", type(self.scheduler).__name__],
                 **{name: ["fastdiff", cls] for name, cls in TEXT_COMPONENTS.items()}}
        write_json_atomic(folder / INDEX_NAME, index)
        return folder


def _text_components(pipe, diffusers) -> DiffusersTextComponents:
    name = type(pipe.scheduler).__name__
    scheduler_class = getattr(diffusers, name, None)
    if not isinstance(scheduler_class, type) or not issubclass(scheduler_class, diffusers.SchedulerMixin):
        raise ValueError(f"fastdiff.to_diffusers: diffusers has no scheduler class {name!r} (this pipeline's); "
                         f"replace pipe.scheduler with one diffusers has, e.g. fastdiff.schedulers.DDIMScheduler")
    sample_size = pipe.settings["sample_size"]  # the latent size; the VAE's sample_size is the image size
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    image_size = sample_size * factor if isinstance(sample_size, int) else [int(s) * factor for s in sample_size]
    return DiffusersTextComponents(
        unet=model_to_diffusers(pipe.unet, sample_size=sample_size),
        vae=model_to_diffusers(pipe.vae, sample_size=image_size),
        scheduler=scheduler_class.from_config(dict(pipe.scheduler.config)),
        text_encoder=copy.deepcopy(pipe.text_encoder).eval(),
        tokenizer=copy.deepcopy(pipe.tokenizer),
        settings=copy.deepcopy(dict(pipe.settings)),
    )


def save_diffusers_folder(pipe, save_directory: PathLike) -> Path:
    """Write a fastdiff TextToImagePipeline as a diffusers-style pipeline folder (see this module's docstring: unet,
    vae and scheduler as diffusers saves them, text_encoder and tokenizer in fastdiff's format, model_index.json
    naming each). ``fastdiff.pipeline_from_diffusers(folder)`` loads it back (the same images); diffusers loads the
    unet, vae and scheduler with ``from_pretrained(folder, subfolder=...)``. Returns the folder.

    Raises ImportError (naming the extra) without diffusers; ValueError for another pipeline (a pixel
    DiffusionPipeline saves with ``fastdiff.to_diffusers(pipe).save_pretrained(folder)``), a scheduler diffusers
    lacks, or ``save_directory`` being a file.
    """
    from fastdiff.pipelines import TextToImagePipeline

    require_diffusers("fastdiff.interop.save_diffusers_folder")
    if not isinstance(pipe, TextToImagePipeline):
        raise ValueError(f"pipe must be a TextToImagePipeline for save_diffusers_folder, got a {type(pipe).__name__} "
                         f"(a pixel DiffusionPipeline: fastdiff.to_diffusers(pipe).save_pretrained(folder))")
    return pipeline_to_diffusers(pipe).save_pretrained(save_directory)
