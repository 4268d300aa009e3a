"""A ControlNet in the sampling loop: the control map(s) a caller passes, made into the batch the ControlNet takes
(:func:`prepare_control_image`), and :class:`ControlledUNet`, the UNet and its ControlNet as one denoiser with the
UNet's forward signature, which :class:`~fastdiff.pipelines.DiffusionPipeline`'s loop calls in place of the UNet
(through its ``_denoiser`` hook), so there is one loop for every conditioning.

Per step, as diffusers' StableDiffusionControlNetPipeline: the ControlNet runs on the UNet's own batch (the scaled
model input [uncond; cond] under guidance, the timestep and the context), its control map batched the same way
([map; map]); its residuals, times ``conditioning_scale``, go into the UNet's skips and middle block. Guess mode
under guidance: the ControlNet runs on the conditional half only and the unconditional half gets zero residuals
(a globally pooled ControlNet, ``global_pool_conditions``, is always run so, as diffusers does).

CUDA graphs capture the whole :class:`ControlledUNet` call (ControlNet and UNet, and with DDIM/DDPM the fused step
too): it is an ``nn.Module`` holding both models, so its fingerprint covers both. What changes between calls lives
in tensors the graph reads at fixed addresses: the control map (a static buffer per shape, dtype and device, filled
in place by :meth:`ControlledUNet.set_control`) and the residual scales (a (n + 1,) float32 buffer, so a new
``conditioning_scale`` needs no new capture). What changes the captured computation (guess mode's split batch) is a
separate instance: the pipeline keeps one per mode, so each has its own graphs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.unet import skip_layout
from fastdiff.pipelines.cuda_graph import static_copy

# ITU-R 601-2 luma, the weights of PIL's convert("L"): an RGB map → one channel
LUMA = (0.299, 0.587, 0.114)


def check_controlnet(unet, controlnet, name: str = "controlnet") -> None:
    """``controlnet`` must be a fastdiff ControlNet whose residuals fit ``unet``: the same input channels, skip
    states (channels and resolutions) and context width. TypeError / ValueError naming ``name``."""
    from fastdiff.models import ControlNet

    if not isinstance(controlnet, ControlNet):
        raise TypeError(f"{name} must be a fastdiff.models.ControlNet (or None), got {type(controlnet).__name__}")
    cn, un = controlnet.config, unet.config
    for field in ("in_channels", "context_dim"):
        if getattr(cn, field) != getattr(un, field, None):
            raise ValueError(f"{name}.config.{field} is {getattr(cn, field)!r} but the UNet's is "
                             f"{getattr(un, field, None)!r}: the ControlNet must be made for this UNet "
                             f"(ControlNet.from_unet)")
    if skip_layout(cn) != skip_layout(un) or tuple(cn.channels) != tuple(un.channels):
        raise ValueError(f"{name}'s encoder (channels {tuple(cn.channels)}, layers_per_block {cn.layers_per_block}) "
                         f"does not match the UNet's (channels {tuple(un.channels)}, layers_per_block "
                         f"{un.layers_per_block}): its residuals would not fit the UNet's skips (ControlNet.from_unet)")


# --------------------------------------------------------------------------------------------- control maps
def _from_array(name: str, array: np.ndarray, channels: int, single: bool, what: str) -> Tensor:
    """A numpy map → (B, C, H, W) float32 in [0, 1]: (H, W), (H, W, C) or, unless ``single`` (an item of a list),
    (B, H, W, C); uint8 is divided by 255; bool is {0, 1}; floating must be in [0, 1]."""
    if array.dtype == np.uint8:
        data = array.astype(np.float32) / 255.0
    elif array.dtype == np.bool_:
        data = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        data = array.astype(np.float32)
        if not np.isfinite(data).all() or data.min(initial=0.0) < 0 or data.max(initial=0.0) > 1:
            raise ValueError(f"{name}: a floating array must hold values in [0, 1] (or give uint8 in [0, 255]), got "
                             f"values in [{float(np.nanmin(data))}, {float(np.nanmax(data))}]")
    else:
        raise TypeError(f"{name}: an array must be uint8, bool or floating in [0, 1], got dtype {array.dtype}")
    if data.ndim == 2:
        data = data[None, :, :, None]
    elif data.ndim == 3:
        data = data[None]
    elif data.ndim != 4 or single:
        raise ValueError(f"{name}: an array must have shape (H, W), (H, W, C)"
                         f"{'' if single else ' or (B, H, W, C)'}, got {array.shape}")
    c = data.shape[-1]
    if c == 3 and channels == 1:  # RGB → gray
        data = (data * np.asarray(LUMA, dtype=np.float32)).sum(-1, keepdims=True)
    elif c == 1 and channels == 3:  # gray → RGB
        data = np.repeat(data, 3, axis=-1)
    elif c != channels:
        raise ValueError(f"{name}: an array has {c} channels, {what}={channels} (1 or 3 convert to each other)")
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).clamp_(0, 1)


def _from_pil(name: str, image, channels: int, what: str) -> Tensor:
    mode = image.mode
    if mode in ("1", "LA"):
        image = image.convert("L")
    elif mode in ("P", "RGBA", "CMYK", "YCbCr"):
        image = image.convert("RGB")
    elif mode not in ("L", "RGB"):
        raise ValueError(f"{name}: PIL images of mode {mode!r} are not supported (give an L or RGB image)")
    return _from_array(name, np.asarray(image), channels, True, what)


def _from_tensor(name: str, tensor: Tensor, channels: int, what: str) -> Tensor:
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: a tensor must be floating, in [0, 1], got dtype {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or 0 in tensor.shape:
        raise ValueError(f"{name}: a tensor must have shape (B, C, H, W) or (C, H, W), got {tuple(tensor.shape)}")
    if tensor.shape[1] != channels:
        raise ValueError(f"{name}: a tensor has {tensor.shape[1]} channels (shape {tuple(tensor.shape)}), "
                         f"{what}={channels}")
    tensor = tensor.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(tensor).all()) or float(tensor.min()) < 0 or float(tensor.max()) > 1:
        raise ValueError(f"{name}: a tensor must hold values in [0, 1], got values in [{float(tensor.min())}, "
                         f"{float(tensor.max())}]")
    return tensor


def _one(name: str, item, channels: int, single: bool, what: str) -> Tensor:
    if isinstance(item, Tensor):
        return _from_tensor(name, item, channels, what)
    if isinstance(item, np.ndarray):
        return _from_array(name, item, channels, single, what)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover — pillow is a dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return _from_pil(name, item, channels, what)
    raise TypeError(f"{name} must be a torch.Tensor, a numpy array, a PIL image or a list of them, got "
                    f"{type(item).__name__}")


def prepare_control_image(image, channels: int, size: tuple[int, int], num_prompts: Optional[int], per_prompt: int,
                          name: str = "image", what: str = "the ControlNet takes conditioning_channels") -> Tensor:
    """The control map(s) a caller gives → (num_prompts·per_prompt, channels, H, W) float32 on the CPU in [0, 1].

    ``image``: a (B, C, H, W) or (C, H, W) floating tensor in [0, 1]; a numpy array (H, W), (H, W, C) or
    (B, H, W, C), uint8 (÷ 255), bool or floating in [0, 1]; a PIL image (L or RGB; 1, LA, P, RGBA … converted); or a
    non-empty list of these (their batches concatenated). Channels: a tensor must have ``channels``; an array's or a
    PIL image's RGB becomes gray (ITU-R 601 luma 0.299, 0.587, 0.114) for a 1-channel ControlNet and gray becomes
    RGB for a 3-channel one. Size: a map of another size than ``size`` (H, W) is resized to it (bilinear, antialiased
    when shrinking, aspect ratio not kept), then clamped to [0, 1]. Batch B: 1 (every image), ``num_prompts`` (one
    per prompt, repeated for its ``per_prompt`` images, as diffusers does) or ``num_prompts·per_prompt`` (one per
    image, in the pipeline's image order); ``num_prompts=None`` keeps the batch as given. The same rules read an
    IP-Adapter's image prompts (``what`` names the model in the channel errors).
    Raises TypeError / ValueError naming ``name``.
    """
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} must not be an empty list")
    maps = []
    for i, item in enumerate(items):
        label = name if len(items) == 1 and not isinstance(image, (list, tuple)) else f"{name}[{i}]"
        m = _one(label, item, channels, isinstance(image, (list, tuple)), what)
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
        maps.append(m)
    maps = torch.cat(maps)
    if num_prompts is None:
        return maps
    b, total = maps.shape[0], num_prompts * per_prompt
    if b == total:
        return maps
    if b == 1:
        return maps.expand(total, -1, -1, -1).contiguous()
    if b == num_prompts:
        return maps.repeat_interleave(per_prompt, dim=0)
    options = {1: "1 (for every image)"}
    options.setdefault(num_prompts, f"{num_prompts} (one per prompt)")
    options.setdefault(total, f"{total} (one per image)")
    raise ValueError(f"{name} holds {b} control maps; give {' or '.join(options.values())}: {num_prompts} "
                     f"prompt(s) × {per_prompt} image(s) each")


def residual_scales(controlnet, scale: float, guess_mode: bool) -> list[float]:
    """The factor of each residual (the down ones, then the middle one): ``scale`` each, or in guess mode
    ``torch.logspace(-1, 0, n + 1) · scale`` (0.1 for the first skip up to 1 for the middle, as
    :class:`~fastdiff.models.ControlNet` and diffusers scale it; not for a globally pooled ControlNet)."""
    n = len(skip_layout(controlnet.config))
    if guess_mode and not controlnet.config.global_pool_conditions:
        return (torch.logspace(-1, 0, n + 1) * scale).tolist()
    return [float(scale)] * (n + 1)


# --------------------------------------------------------------------------------------------- the denoiser
class ControlledUNet(nn.Module):
    """A UNet and its ControlNet as one denoiser: ``forward(x, t, class_labels=None, context=None, **unet_kwargs)``
    (the UNet's signature; ``unet_kwargs`` such as a distilled UNet's ``guidance`` go to the UNet only) → the UNet's
    output with the ControlNet's residuals added, for the control map and scales of :meth:`set_control`.

    ``split``: the batch is [uncond; cond] in guess mode: the ControlNet runs on the second half (x, t, labels,
    context) and the first half gets zero residuals. ``.config`` is the UNet's. Set ``compiled`` to a callable with
    the UNet's signature (a :class:`~fastdiff.pipelines.compiled.CompiledModel` of the UNet) to run the UNet through
    it; the ControlNet then runs eagerly.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, split: bool = False):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.split = bool(split)
        self.compiled = None  # the UNet's compiled callable, or None (eager)
        self._static: dict[tuple, Tensor] = {}  # (shape, dtype, device) → static control map / residual scales
        self._cond: Optional[Tensor] = None
        self._scales: Optional[Tensor] = None

    @property
    def config(self):
        return self.unet.config

    def set_control(self, cond: Tensor, scales: Sequence[float]) -> None:
        """Copy the control map (the ControlNet's batch: [map; map] under guidance, the conditional half's map with
        ``split``) and the residual scales (one per down residual, then the middle one) into this module's static
        buffers, which every later forward (and graph replay) reads."""
        self._cond = static_copy(self._static, cond)
        self._scales = static_copy(self._static, torch.tensor(list(scales), dtype=torch.float32), cond.device)

    def forward(self, x: Tensor, t, class_labels: Optional[Tensor] = None, context: Optional[Tensor] = None,
                **unet_kwargs) -> Tensor:
        if self._cond is None:
            raise RuntimeError("ControlledUNet.set_control(cond, scales) must run before the first call")
        cond, scales = self._cond, self._scales
        if self.split:
            half = x.shape[0] // 2

            def second(v):
                return v[half:] if isinstance(v, Tensor) and v.ndim >= 1 else v

            down, mid = self.controlnet(x[half:], second(t), cond, class_labels=second(class_labels),
                                        context=second(context))
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        else:
            down, mid = self.controlnet(x, t, cond, class_labels=class_labels, context=context)
        down = tuple(r * scales[i] for i, r in enumerate(down))
        mid = mid * scales[len(down)]
        unet = self.unet if self.compiled is None else self.compiled
        return unet(x, t, class_labels=class_labels, context=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, **unet_kwargs)
