"""The native extension fastdiff._C (VQ nearest-codebook search): loading, just-in-time build, and dispatch.

PLACEHOLDER — being written for issue 3. Until then vq_nearest runs the reference path.
"""

from __future__ import annotations

import torch

from fastdiff import dispatch, reference


def status() -> str:
    return "not built"


def vq_path(device: torch.device) -> str:
    return "torch"


def vq_nearest(z, codebook, *, return_distances=False, backend=None):
    dispatch.check_backend(backend)
    idx, dist = reference.vq_nearest(z, codebook)
    return (idx, dist) if return_distances else idx
