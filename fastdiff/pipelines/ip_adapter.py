"""An IP-Adapter in the sampling loop: :class:`IPAdaptedUNet`, the denoiser (the UNet, or the UNet with its
ControlNet) run with an attached :class:`fastdiff.models.IPAdapter`'s image tokens, with the UNet's forward signature,
which :class:`~fastdiff.pipelines.DiffusionPipeline`'s loop calls in place of the UNet (through its ``_denoiser``
hook), so one loop serves every conditioning, combined.

Per step, as diffusers' IP-Adapter pipelines: the UNet's batch is [uncond; cond] under guidance, and so are the image
tokens: the unconditional half gets the tokens of a zero image embedding (what the adapter saw when its image was
dropped in training), the conditional half the image prompt's. A ControlNet in the same call sees the text only (its
cross-attention carries no adapter).

CUDA graphs capture the whole :class:`IPAdaptedUNet` call: it is an ``nn.Module`` holding the denoiser and the
adapter, so its fingerprint covers both; the image tokens and the scale live in static buffers filled in place by
:meth:`IPAdaptedUNet.set_image`, so a new image prompt or ``ip_adapter_scale`` needs no new capture.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff.pipelines.cuda_graph import static_copy


class IPAdaptedUNet(nn.Module):
    """``model`` (a UNet, or a :class:`~fastdiff.pipelines.controlnet.ControlledUNet`) with ``adapter`` attached to
    its UNet: ``forward(x, t, class_labels=None, context=None, **kwargs)`` → the model's output with the adapter's
    image branch on the tokens of :meth:`set_image`. Set ``compiled`` to a callable with the UNet's signature (a
    compiled UNet) to call it in place of ``model``."""

    def __init__(self, model: nn.Module, adapter: nn.Module):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.compiled = None
        self._static: dict[tuple, Tensor] = {}  # (shape, dtype, device) → static image tokens / 0-dim scale
        self._current: Optional[tuple[Tensor, Tensor]] = None

    @property
    def config(self):
        return self.model.config

    def set_image(self, tokens: Tensor, scale: float) -> None:
        """Copy the image tokens (B, K, d) (the UNet's batch: [uncond; cond] under guidance) and the scale into
        this module's static buffers, which every later forward (and graph replay) reads."""
        self._current = (static_copy(self._static, tokens),
                         static_copy(self._static, torch.tensor(float(scale), dtype=tokens.dtype), tokens.device))

    def forward(self, x: Tensor, t, class_labels: Optional[Tensor] = None, context: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        if self._current is None:
            raise RuntimeError("IPAdaptedUNet.set_image(tokens, scale) must run before the first call")
        tokens, scale = self._current
        model = self.model if self.compiled is None else self.compiled
        with self.adapter.conditioned(tokens, scale):
            return model(x, t, class_labels=class_labels, context=context, **kwargs)
