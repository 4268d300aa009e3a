"""Text-to-image latent diffusion, the Stable Diffusion data path: prompt → tokenizer → text encoder → (B, M, d)
hidden states → a latent UNet that cross-attends to them → the VAE decodes the latents.

Classifier-free guidance batches [negative; prompt] through one UNet call: the unconditional half is the encoded
``negative_prompt`` (default: the empty prompt ``""``, which is what the training recipe's prompt dropout used), and
with DDIM/DDPM the combine uncond + s·(cond − uncond) runs inside the fused step kernel.

An optional ControlNet (the ``controlnet`` component, :class:`fastdiff.models.ControlNet`) follows a control map
(``image=``, e.g. :func:`fastdiff.control.edge_map` of a digit): it runs inside the same loop, wrapped with the UNet
as one denoiser (:class:`fastdiff.pipelines.controlnet.ControlledUNet`, through the base class's ``_denoiser``
hook). An IP-Adapter (the ``image_encoder`` and ``ip_adapter`` components: :class:`fastdiff.models.ImageEncoder`,
:class:`fastdiff.models.IPAdapter`) follows an image prompt (``ip_adapter_image=``) the same way: its image tokens
go to the UNet's cross-attention layers through :class:`fastdiff.pipelines.ip_adapter.IPAdaptedUNet`, wrapping
the UNet or the UNet with its ControlNet, so both combine in one call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastdiff.files import read_json_object
from fastdiff.pipelines.base import DEFAULT_STEPS, INDEX_NAME, _load_component, base_model_path
from fastdiff.pipelines.controlnet import ControlledUNet, check_controlnet, prepare_control_image, residual_scales
from fastdiff.pipelines.diffusion import LatentDiffusionPipeline, check_class_labels
from fastdiff.pipelines.ip_adapter import IPAdaptedUNet
from fastdiff.validation import check_bool, check_positive_int, check_real

Prompts = Union[None, str, Sequence[str]]


def _prompt_list(name: str, prompt) -> Optional[list[str]]:
    """``prompt`` as a non-empty list of strings (a str is one prompt), or None."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{name} must not be an empty list (give at least one prompt, or \"\" for none)")
    bad = [type(p).__name__ for p in prompt if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must hold only str, got {bad[0]}")
    return list(prompt)


class TextToImagePipeline(LatentDiffusionPipeline):
    """Prompt-conditioned latent diffusion: ``TextToImagePipeline(unet, vae, scheduler, text_encoder, tokenizer)``.

    ``pipe(prompt=["a bold seven", "3"], negative_prompt=None, num_inference_steps=25, guidance_scale=4.0,
    generator=0, output_type="np")`` → one image per prompt (× ``num_images_per_prompt``): a list of PIL images,
    a (B, H, W, C) float32 array in [0, 1] ("np") or a (B, C, H, W) float32 tensor in [0, 1] ("pt").

    The UNet (``config.context_dim`` = the text encoder's hidden size) cross-attends to every position of the
    text encoder's ``last_hidden_state`` (B, max_length, d), padding positions included (as Stable Diffusion does
    with CLIP's padded 77 tokens): the encoding of a prompt does not depend on what else is in the batch.

    ``controlnet`` (optional, None by default; saved as null in model_index.json): a
    :class:`fastdiff.models.ControlNet` made for this UNet (``ControlNet.from_unet``); ``pipe(prompt, image=control)``
    then follows the control map. A ControlNet shipped apart from its base model is a folder naming the base
    (:func:`fastdiff.pipelines.save_extension`), and ``fastdiff.load(folder)`` returns the base pipeline with it.

    ``image_encoder`` + ``ip_adapter`` (optional, both or neither): an :class:`fastdiff.models.ImageEncoder` and the
    :class:`fastdiff.models.IPAdapter` made for this UNet; ``pipe(prompt="", ip_adapter_image=digit)`` then follows
    the image prompt, with or without a control map. :meth:`load_ip_adapter` / :meth:`unload_ip_adapter` add and
    remove them (the UNet's weights are never changed); ``fastdiff.load("digits-ip-adapter")`` is digits-sd with the
    shipped one.
    """

    component_names = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "controlnet", "image_encoder",
                       "ip_adapter")
    # generic callers (fastdiff.hub.sampling_defaults: sample, eval, generate) treat the model as having this many
    # classes: label i stands for the prompt str(i) (see ``class_labels``)
    label_prompts = 10

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer,
                 sample_size: Union[int, tuple[int, int], None] = None, controlnet=None, image_encoder=None,
                 ip_adapter=None):
        super().__init__(unet, vae, scheduler, sample_size)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if controlnet is not None:
            check_controlnet(unet, controlnet)
        self.controlnet = controlnet
        # split (guess mode under CFG) → the UNet + ControlNet wrapper, kept between calls (the key of its CUDA
        # graphs, and its static buffers, stay the same)
        self._controlled: dict[bool, ControlledUNet] = {}
        self._control = None  # during a call with ``image``: (maps, scale, guess_mode)
        self.image_encoder, self.ip_adapter = image_encoder, ip_adapter
        self._check_ip_adapter()
        self._ip_adapted: dict[object, IPAdaptedUNet] = {}  # the denoiser it wraps → the wrapper, kept as _controlled
        self._ip = None  # during a call with ``ip_adapter_image``: (tokens [uncond; cond] (B, K, d), scale)
        context_dim = getattr(unet.config, "context_dim", None)
        hidden = text_encoder.config.hidden_size
        if context_dim != hidden:
            raise ValueError(f"unet.config.context_dim ({context_dim}) must equal the text encoder's hidden_size "
                             f"({hidden})")
        if tokenizer.max_length > text_encoder.config.max_length:
            raise ValueError(f"tokenizer.max_length ({tokenizer.max_length}) exceeds the text encoder's max_length "
                             f"({text_encoder.config.max_length})")

    def _check_components(self) -> None:
        """After components were set on a built pipeline (an extension folder's, see :func:`load_pipeline`)."""
        if self.controlnet is not None:
            check_controlnet(self.unet, self.controlnet)
        self._check_ip_adapter()

    def _check_placement(self, name: str) -> None:
        """ValueError unless the component ``name`` (a model attached after the pipeline was built) is on the
        pipeline's device and dtype."""
        param = next(getattr(self, name).parameters())
        if param.device != self.device or param.dtype != self.dtype:
            raise ValueError(f"{name} is on {param.device} in {param.dtype} but the pipeline on {self.device} in "
                             f"{self.dtype}: call pipe.to(...) after attaching it")

    # ----------------------------------------------------------------- the IP-Adapter
    def _check_ip_adapter(self) -> None:
        """The image_encoder / ip_adapter pair: both or neither, of the right types, made for each other and for
        this UNet (TypeError / ValueError naming the component); attaches the adapter to the UNet."""
        from fastdiff.models import ImageEncoder, IPAdapter

        encoder, adapter = self.image_encoder, self.ip_adapter
        if encoder is None and adapter is None:
            return
        if encoder is None or adapter is None:
            have, lack = ("ip_adapter", "image_encoder") if encoder is None else ("image_encoder", "ip_adapter")
            raise ValueError(f"image_encoder and ip_adapter come together: got {have} without {lack}")
        if not isinstance(encoder, ImageEncoder):
            raise TypeError(f"image_encoder must be a fastdiff.models.ImageEncoder, got {type(encoder).__name__}")
        if not isinstance(adapter, IPAdapter):
            raise TypeError(f"ip_adapter must be a fastdiff.models.IPAdapter, got {type(adapter).__name__}")
        if encoder.config.projection_dim != adapter.config.image_embed_dim:
            raise ValueError(f"image_encoder.config.projection_dim ({encoder.config.projection_dim}) must equal "
                             f"ip_adapter.config.image_embed_dim ({adapter.config.image_embed_dim})")
        adapter.check_unet(self.unet)
        adapter.attach(self.unet)

    def load_ip_adapter(self, source: str = "digits-ip-adapter") -> None:
        """Add an IP-Adapter: ``source`` is a shipped model's name ("digits-ip-adapter") or a folder holding
        ``image_encoder/`` and ``ip_adapter/`` (an extension folder from :func:`fastdiff.pipelines.save_extension`,
        or a saved pipeline). They are moved to the pipeline's device and dtype and attached to the UNet (replacing
        an adapter it had); the UNet's weights are unchanged. ValueError naming ``source`` if it has none, or they
        do not fit this UNet (checked before anything changes)."""
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
            raise TypeError(f"source must be a shipped model's name or a folder path, got {source!r}")
        folder = base_model_path(Path.cwd(), str(source))
        index_file = folder / INDEX_NAME
        index = read_json_object(index_file)
        missing = [n for n in ("image_encoder", "ip_adapter") if not index.get(n)]
        if missing:
            raise ValueError(f"source {str(source)!r} ({index_file}) holds no {' and no '.join(missing)}")
        encoder = _load_component(folder, index_file, "image_encoder", index["image_encoder"])
        adapter = _load_component(folder, index_file, "ip_adapter", index["ip_adapter"])
        old = self.image_encoder, self.ip_adapter
        self.image_encoder, self.ip_adapter = encoder, adapter
        try:
            self._check_ip_adapter()  # checked, then attached in place of the old adapter's hooks
        except (TypeError, ValueError) as exc:
            self.image_encoder, self.ip_adapter = old
            raise ValueError(f"source {str(source)!r}: {exc}") from None
        encoder.to(self.device, self.dtype).eval()
        adapter.to(self.device, self.dtype).eval()
        scale = (index.get("settings") or {}).get("default_ip_adapter_scale")
        if scale is not None:
            self.settings["default_ip_adapter_scale"] = scale

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapter (detached from the UNet, whose weights never changed); a no-op without one."""
        if self.ip_adapter is not None:
            self.ip_adapter.detach(self.unet)
        self.image_encoder = self.ip_adapter = None
        self._ip_adapted.clear()
        self.settings.pop("default_ip_adapter_scale", None)

    def set_ip_adapter_scale(self, scale: float) -> None:
        """The ``ip_adapter_scale`` of later calls that do not pass one (0: the base model's images exactly)."""
        self.settings["default_ip_adapter_scale"] = check_real("scale", scale)

    @torch.inference_mode()
    def encode_image(self, ip_adapter_image) -> Tensor:
        """The image encoder's embeddings (B, projection_dim) of an image prompt (any form ``ip_adapter_image``
        takes, see :meth:`__call__`), in the pipeline's device and dtype."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no IP-Adapter: load one with pipe.load_ip_adapter('digits-ip-adapter')")
        pixels = self._ip_pixels(ip_adapter_image, None, 1)
        return self.image_encoder(pixels.to(self.device, self.dtype))

    def _ip_pixels(self, image, num_prompts: Optional[int], per_prompt: int) -> Tensor:
        """Image prompt(s) → (B, C, S, S) float32 CPU in [−1, 1] (the image encoder's input)."""
        cfg = self.image_encoder.config
        pixels = prepare_control_image(image, cfg.in_channels, (cfg.sample_size, cfg.sample_size), num_prompts,
                                       per_prompt, name="ip_adapter_image", what="the image encoder takes in_channels")
        return pixels * 2 - 1

    def _check_ip(self, image, scale, num_prompts: int, per_prompt: int):
        """The checked image prompt of a call: None without ``ip_adapter_image``, else (pixels (B, C, S, S) float32
        CPU in [−1, 1], one per image, scale)."""
        if scale is not None:
            check_real("ip_adapter_scale", scale)
        if image is None:
            if scale is not None:
                raise ValueError("ip_adapter_scale needs ip_adapter_image (an image prompt)")
            return None
        if self.ip_adapter is None:
            raise ValueError("ip_adapter_image (an image prompt) needs an IP-Adapter, and this pipeline has none: "
                             "pipe.load_ip_adapter('digits-ip-adapter') or fastdiff.load('digits-ip-adapter')")
        self._check_ip_adapter()
        self._check_placement("image_encoder")
        self._check_placement("ip_adapter")
        if scale is None:
            scale = self.settings.get("default_ip_adapter_scale", 1.0)
        scale = check_real("ip_adapter_scale", scale)
        return self._ip_pixels(image, num_prompts, per_prompt), scale

    # ----------------------------------------------------------------- prompts → hidden states
    @torch.inference_mode()
    def encode_prompt(self, prompt: Union[str, Sequence[str]]) -> Tensor:
        """The text encoder's ``last_hidden_state`` of ``prompt`` (a str or a list of B str): (B, max_length,
        hidden_size) in the pipeline's device and dtype. Unknown words become [UNK] and long prompts are truncated
        to ``tokenizer.max_length`` tokens, each with a warning (see :class:`fastdiff.models.WordTokenizer`)."""
        prompts = _prompt_list("prompt", prompt)
        if prompts is None:
            raise ValueError("prompt must be a str or a non-empty list of str, got None")
        tokens = self.tokenizer(prompts)
        device = self.device
        out = self.text_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return out.last_hidden_state.to(self.dtype)

    def _check_embeds(self, name: str, embeds) -> Tensor:
        d = self.unet.config.context_dim
        if not isinstance(embeds, Tensor) or not embeds.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor (B, M, {d}), got "
                            f"{embeds.dtype if isinstance(embeds, Tensor) else type(embeds).__name__}")
        if embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[1] < 1 or embeds.shape[2] != d:
            raise ValueError(f"{name} must have shape (B, M, {d}), got {tuple(embeds.shape)}")
        return embeds

    # ----------------------------------------------------------------- sampling
    def __call__(  # noqa: C901 — one flat list of argument checks, then the sampling loop of the base class
        self,
        prompt: Prompts = None,
        negative_prompt: Prompts = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator=None,
        output_type: str = "pil",
        progress: bool = True,
        *,
        prompt_embeds: Optional[Tensor] = None,
        negative_prompt_embeds: Optional[Tensor] = None,
        num_images_per_prompt: int = 1,
        class_labels=None,
        batch_size: Optional[int] = None,
        eta: float = 0.0,
        latents: Optional[Tensor] = None,
        image=None,
        controlnet_conditioning_scale: Optional[float] = None,
        guess_mode: bool = False,
        ip_adapter_image=None,
        ip_adapter_scale: Optional[float] = None,
    ):
        """Sample one image per prompt (× ``num_images_per_prompt``).

        Args:
            prompt: a str or a non-empty list of B str ("a bold seven", "the digit 4, slanted right", "3").
            negative_prompt: what to steer away from under guidance: a str (used for every prompt) or a list of B
                str; None: the empty prompt "" (the unconditional model).
            num_inference_steps: sampler steps in [1, num_train_timesteps]; None: the model's ``default_steps``.
            guidance_scale: classifier-free guidance s; None: the model's ``default_guidance_scale``; 1.0: the
                conditional model alone (one UNet batch per step, negative prompts not allowed).
            generator: an int seed, a torch.Generator (or a list, one per image) or None.
            output_type: "pil", "np" or "pt" (as :class:`DiffusionPipeline`).
            progress: show a tqdm bar.
            prompt_embeds: (B, M, context_dim) floating hidden states in place of ``prompt`` (e.g. from
                :meth:`encode_prompt`, edited); negative_prompt_embeds: the same for the negative side, of the same
                shape (default: the encoded empty prompt).
            num_images_per_prompt: images per prompt, an integer ≥ 1 (image order: prompt 0's images first).
            class_labels: a shorthand for class-conditional callers (``fastdiff eval``, ``fastdiff generate``): an
                int or B ints 0…9 stand for the prompts "0" … "9"; with ``batch_size`` an int label repeats.
            batch_size: only with ``class_labels`` (the number of images); prompts set the batch otherwise.
            eta: DDIM's η.
            latents: the initial noise (B, C, h, w) instead of drawing it.
            image: the control map(s) of the ``controlnet`` (needs one; without ``image`` a pipeline with a
                ControlNet samples as the base model, the ControlNet unused): a (B, C, H, W) or (C, H, W) floating
                tensor in [0, 1]; a numpy array (H, W), (H, W, C) or (B, H, W, C), uint8 or floating in [0, 1]; a
                PIL image; or a list of these. C must be ``controlnet.config.conditioning_channels``, except that an
                array's or PIL image's RGB is made gray (luma 0.299, 0.587, 0.114) for a 1-channel ControlNet (and
                gray RGB for a 3-channel one). The ControlNet takes maps of the latent size × 2**(len(
                ``conditioning_embedding_out_channels``) − 1) (the image size when that factor is the VAE's, e.g.
                16×16 for digits-controlnet); a map of another size is resized to it (bilinear, antialiased when
                shrinking, then clamped to [0, 1]). Batch: 1 (every image), one per prompt (repeated for its
                ``num_images_per_prompt`` images, as diffusers does) or one per image (prompt 0's images first).
            controlnet_conditioning_scale: a real number multiplying the ControlNet's residuals (0: the base model's
                images exactly); None: the model's ``default_controlnet_conditioning_scale`` setting, else 1.0.
                Only with ``image``.
            guess_mode: diffusers' guess mode: under guidance the ControlNet runs on the conditional half only (the
                unconditional half gets no residuals) and its residuals are scaled from 0.1 (the first skip) up to
                1.0 (the middle block) times the scale. Always so under guidance for a globally pooled ControlNet
                (``global_pool_conditions``, whose residuals are not ramped). Only with ``image``.
            ip_adapter_image: the image prompt(s) of the IP-Adapter (needs ``image_encoder`` + ``ip_adapter``):
                the same forms and batch rules as ``image`` (tensors in [0, 1], arrays, PIL images, lists), with
                ``image_encoder.config.in_channels`` channels (RGB made gray), resized to its ``sample_size``
                (16×16 for digits-ip-adapter). An empty ``prompt=""`` lets the image alone set the content. Under
                guidance the unconditional half gets a zero image embedding. Combines with ``image`` (a ControlNet).
            ip_adapter_scale: a real number multiplying the adapter's image attention in every cross-attention
                layer (0: the base model's images exactly); None: the model's ``default_ip_adapter_scale``
                (:meth:`set_ip_adapter_scale`), else 1.0. Only with ``ip_adapter_image``.
        Raises:
            ValueError / TypeError naming the argument, before any work: none or more than one of prompt,
            prompt_embeds and class_labels; an empty prompt list or a non-str prompt; a negative_prompt list of
            another length than prompt; negative_prompt (or its embeds) without guidance (guidance_scale 1.0); embeds
            of the wrong type or shape; ``image`` without a controlnet, of a wrong type, shape, channel count, value
            range or batch, a controlnet not made for this UNet or not on the pipeline's device and dtype;
            controlnet_conditioning_scale not a real number, or guess_mode not a bool, or either without ``image``;
            ip_adapter_image without an IP-Adapter or of a wrong type, shape, channel count, value range or batch,
            ip_adapter_scale not a real number or without ip_adapter_image; and everything :class:`DiffusionPipeline`
            checks (steps, output_type, …).
            NonFiniteError: NaN/Inf in the latents (naming the step).
        """
        given = [n for n, v in (("prompt", prompt), ("prompt_embeds", prompt_embeds),
                                ("class_labels", class_labels)) if v is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of prompt, prompt_embeds (and class_labels as a shorthand), got "
                             + (", ".join(given) if given else "none"))
        if batch_size is not None and class_labels is None:
            raise ValueError("batch_size is set by the prompts: pass it only with class_labels")
        per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        settings = self.settings
        if num_inference_steps is None:
            num_inference_steps = int(settings.get("default_steps", DEFAULT_STEPS))
        if guidance_scale is None:
            guidance_scale = settings.get("default_guidance_scale")
        if guidance_scale is not None:
            check_real("guidance_scale", guidance_scale)
        # [negative; prompt] batches under guidance, as the base class decides (a guidance-distilled UNet takes the
        # scale as an input and runs on the prompts alone)
        distilled = getattr(self.unet.config, "guidance_embedding_dim", None) is not None
        cfg = not distilled and guidance_scale is not None and float(guidance_scale) != 1.0

        if class_labels is not None:
            prompts = self._label_prompts(class_labels, batch_size)
        else:
            prompts = _prompt_list("prompt", prompt)
        if prompt_embeds is not None:
            prompt_embeds = self._check_embeds("prompt_embeds", prompt_embeds)
        n = len(prompts) if prompts is not None else prompt_embeds.shape[0]

        negatives = _prompt_list("negative_prompt", negative_prompt)
        if negatives is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if (negatives is not None or negative_prompt_embeds is not None) and not cfg:
            raise ValueError("negative_prompt needs classifier-free guidance: guidance_scale must be set and ≠ 1.0")
        if negatives is not None:
            if len(negatives) == 1 and isinstance(negative_prompt, str):
                negatives = negatives * n
            if len(negatives) != n:
                raise ValueError(f"negative_prompt has {len(negatives)} prompts but prompt has {n}: give one str "
                                 f"or one per prompt")
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = self._check_embeds("negative_prompt_embeds", negative_prompt_embeds)
            if prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError("negative_prompt_embeds must come with prompt_embeds of the same shape, got "
                                 f"{tuple(negative_prompt_embeds.shape)} and "
                                 f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}")
        elif cfg and prompt_embeds is not None and prompt_embeds.shape[1] != self.tokenizer.max_length:
            # the negative side is encoded from text: tokenizer.max_length tokens, concatenated with prompt_embeds
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[1]} tokens but the encoded negative prompt has "
                             f"tokenizer.max_length = {self.tokenizer.max_length}: under guidance pass prompt_embeds "
                             f"of {self.tokenizer.max_length} tokens or negative_prompt_embeds of prompt_embeds' shape")

        self._check_run(n * per_prompt, num_inference_steps, output_type)
        if latents is not None and tuple(latents.shape) != self._latent_shape(n * per_prompt):
            raise ValueError(f"latents must have shape {self._latent_shape(n * per_prompt)}, got "
                             f"{tuple(latents.shape)}")
        control = self._check_control(image, controlnet_conditioning_scale, guess_mode, n, per_prompt)
        ip = self._check_ip(ip_adapter_image, ip_adapter_scale, n, per_prompt)

        # encode (after every check)
        context = self.encode_prompt(prompts) if prompt_embeds is None else prompt_embeds.to(self.device, self.dtype)
        negative_context = None
        if cfg:
            if negative_prompt_embeds is not None:
                negative_context = negative_prompt_embeds.to(self.device, self.dtype)
            else:
                negative_context = self.encode_prompt(negatives if negatives is not None else [""])
                negative_context = negative_context.expand(n, -1, -1) if negatives is None else negative_context
        if per_prompt > 1:
            context = context.repeat_interleave(per_prompt, dim=0)
            if negative_context is not None:
                negative_context = negative_context.repeat_interleave(per_prompt, dim=0)
        if ip is not None:
            self._prefer_channels_last()  # before the image encoder runs: every call encodes in one layout
        self._ip = None if ip is None else self._image_tokens(*ip, cfg)
        self._control = control
        try:
            return super().__call__(n * per_prompt, num_inference_steps, generator, guidance_scale, None, output_type,
                                    progress, eta=eta, context=context, negative_context=negative_context,
                                    latents=latents)
        finally:
            self._control = self._ip = None

    @torch.inference_mode()
    def _image_tokens(self, pixels: Tensor, scale: float, cfg: bool):
        """(image tokens of the UNet's batch, scale), or None at scale 0 (no image branch: the base model exactly).
        Under guidance the tokens are [tokens of a zero embedding; the images' tokens]."""
        if scale == 0:
            return None
        embeds = self.image_encoder(pixels.to(self.device, self.dtype))
        tokens = self.ip_adapter(embeds)
        if cfg:
            tokens = torch.cat([self.ip_adapter(torch.zeros_like(embeds)), tokens])
        return tokens, scale

    # ----------------------------------------------------------------- the ControlNet
    def _check_control(self, image, scale, guess_mode, num_prompts: int, per_prompt: int):
        """The checked control of a call: None without ``image``, else (maps (B, C, H, W) float32 CPU, scale,
        guess_mode) with one map per image."""
        if scale is not None:
            check_real("controlnet_conditioning_scale", scale)
        guess_mode = check_bool("guess_mode", guess_mode)
        if image is None:
            for name, given in (("controlnet_conditioning_scale", scale is not None), ("guess_mode", guess_mode)):
                if given:
                    raise ValueError(f"{name} needs image (a control map for the ControlNet)")
            return None
        controlnet = self.controlnet
        if controlnet is None:
            raise ValueError("image (a control map) needs a ControlNet, and this pipeline has none: load a ControlNet "
                             "model (e.g. fastdiff.load('digits-controlnet')) or set pipe.controlnet")
        check_controlnet(self.unet, controlnet)
        self._check_placement("controlnet")
        if scale is None:
            scale = self.settings.get("default_controlnet_conditioning_scale", 1.0)
        scale = check_real("controlnet_conditioning_scale", scale)
        cfg = controlnet.config
        factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        _, _, h, w = self._latent_shape(1)
        maps = prepare_control_image(image, cfg.conditioning_channels, (h * factor, w * factor), num_prompts,
                                     per_prompt)
        return maps, scale, guess_mode

    def _denoiser(self, unet, cfg: bool):
        """With a control map: the UNet and the ControlNet as one denoiser (:class:`ControlledUNet`), its map batched
        as the UNet's input ([map; map] under guidance; the conditional half's only in guess mode). With an image
        prompt: that (or the UNet) with the IP-Adapter's image tokens (:class:`IPAdaptedUNet`)."""
        model = unet if self._control is None else self._controlled_unet(unet, cfg)
        if self._ip is None:
            return model
        tokens, scale = self._ip
        adapter = self.ip_adapter
        if not adapter.is_attached(self.unet):  # the UNet was replaced since: hook the adapter into the new one
            adapter.attach(self.unet)
        inner = model if isinstance(model, ControlledUNet) else self.unet
        wrapper = self._ip_adapted.get(id(inner))
        if wrapper is None or wrapper.model is not inner or wrapper.adapter is not adapter:
            wrapper = self._ip_adapted[id(inner)] = IPAdaptedUNet(inner, adapter)
        wrapper.compiled = None if model is inner else model  # the compiled UNet after compile()
        wrapper.set_image(tokens, scale)
        return wrapper

    def _controlled_unet(self, unet, cfg: bool) -> ControlledUNet:
        """The UNet (``unet``: it or its compiled callable) with the ControlNet and this call's control map."""
        maps, scale, guess_mode = self._control
        controlnet = self.controlnet
        split = cfg and (guess_mode or bool(controlnet.config.global_pool_conditions))
        model = self._controlled.get(split)
        if model is None:
            model = self._controlled[split] = ControlledUNet(self.unet, controlnet, split)
        else:  # the same wrapper (its graphs' key); new models change its fingerprint, so its graphs are redone
            if model.unet is not self.unet:
                model.unet = self.unet
            if model.controlnet is not controlnet:
                model.controlnet = controlnet
        model.compiled = None if unet is self.unet else unet
        cond = maps.to(self.device, self.dtype)
        if cfg and not split:
            cond = torch.cat([cond, cond])
        model.set_control(cond, residual_scales(controlnet, scale, guess_mode))
        return model

    def _label_prompts(self, class_labels, batch_size) -> list[str]:
        """Digit labels → the prompts "0" … "9" (the class-conditional callers' shorthand)."""
        return [str(int(v)) for v in check_class_labels(class_labels, batch_size, self.label_prompts)]
