"""fastdiff: fast samplers for image-generation models.

Fused Triton kernels (GroupNorm+SiLU, attention, DDPM/DDIM update with classifier-free guidance), a native
VQ nearest-codebook search, compact models, diffusers-compatible schedulers and pipelines.
"""

from __future__ import annotations

import logging

from fastdiff import ops  # noqa: F401  (registers the torch.ops.fastdiff custom ops)
from fastdiff._version import __version__  # noqa: F401
from fastdiff.batch_invariance import batch_invariant  # noqa: F401
from fastdiff.dispatch import counts, info, reset_counts  # noqa: F401
from fastdiff.hub import list_models, load  # noqa: F401
from fastdiff.interop import accelerate, from_diffusers, pipeline_from_diffusers, restore, to_diffusers  # noqa: F401
from fastdiff.models.modeling import load_model  # noqa: F401


logging.getLogger("fastdiff").addHandler(logging.NullHandler())

__all__ = ["ops", "batch_invariant", "info", "counts", "reset_counts", "load_model", "load", "list_models", "from_diffusers",
           "pipeline_from_diffusers", "to_diffusers", "accelerate", "restore", "__version__"]
