"""Control maps for ControlNet on the digits: the edge map of a digit, and how well two edge maps agree.

* :func:`edge_map`: the outline of a digit's ink — the pixels of the binarized ink (x > 0, i.e. more than half
  ink) that touch a pixel without ink (or the border) in their 3×3 neighbourhood: (N, 1, H, W) in {0, 1};
* :func:`edge_iou` and :func:`chamfer_distance`: per-image agreement of two edge maps (the controlled sampling
  metric of ``fastdiff eval digits-controlnet``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["edge_map", "edge_iou", "chamfer_distance"]


def _check_maps(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor (N, 1, H, W), got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return x


def edge_map(x: Tensor) -> Tensor:
    """The edge map of images ``x`` (N, 1, H, W), floating, in [−1, 1] (background −1, ink +1).

    ink = x > 0; edge = ink pixels with a non-ink pixel (or the image border) among their 8 neighbours, i.e.
    ``ink − erode₃ₓ₃(ink)``. Returns (N, 1, H, W) float32 in {0, 1} on x's device.
    Raises TypeError / ValueError naming ``x`` for a non-floating, mis-shaped or non-finite input.
    """
    x = _check_maps("x", x)
    ink = (x > 0).float()
    eroded = -F.max_pool2d(-F.pad(ink, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return ink * (1 - eroded)


def _binary(name: str, x) -> Tensor:
    return _check_maps(name, x) > 0.5


def edge_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of the edge pixels (values > 0.5) of ``a`` and ``b`` (N, 1, H, W), per image: (N,)
    float64 on the CPU; 1 where both are empty."""
    a, b = _binary("a", a), _binary("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    inter = (a & b).flatten(1).sum(1).double().cpu()
    union = (a | b).flatten(1).sum(1).double().cpu()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def chamfer_distance(a: Tensor, b: Tensor, chunk: int = 64) -> Tensor:
    """Symmetric Chamfer distance in pixels between the edge pixels (values > 0.5) of ``a`` and ``b`` (N, 1, H, W):
    the mean over a's edge pixels of the distance to the nearest edge pixel of b, plus the same from b to a, halved.
    (N,) float64 on the CPU; 0 where both are empty, the image diagonal where exactly one is."""
    a, b = _binary("a", a), _binary("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    n, _, h, w = a.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], 1)
    dist = torch.cdist(grid, grid)  # (HW, HW)
    diagonal = float((h * h + w * w) ** 0.5)
    a, b = a.flatten(1).cpu(), b.flatten(1).cpu()
    out = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        pa, pb = a[s:s + chunk], b[s:s + chunk]  # (c, HW) bool

        def directed(p, q):  # mean over p's pixels of the distance to q's nearest pixel
            d = dist.unsqueeze(0).masked_fill(~q.unsqueeze(1), float("inf")).amin(2)  # (c, HW)
            count = p.sum(1)
            return torch.where(count > 0, (d * p).nan_to_num(posinf=0.0).sum(1) / count.clamp(min=1), 0.0)

        both = pa.any(1) & pb.any(1)
        one = pa.any(1) ^ pb.any(1)
        value = (directed(pa, pb) + directed(pb, pa)) / 2
        out[s:s + chunk] = torch.where(both, value, torch.where(one, diagonal, 0.0))
    return out
