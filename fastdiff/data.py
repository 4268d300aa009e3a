"""The training data of the shipped models: scikit-learn's bundled handwritten digits (1,797 8×8 images, no
download), upscaled to 16×16, scaled to [−1, 1], split once into train (80%) and held-out (20%) with a fixed seed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def load_digits(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) fp32 in [−1, 1], labels (N,) int64) of ``split`` ("train", "test" or "all").

    Preprocessing: pixel values 0…16 → [0, 1], bilinear upscaling 8×8 → size×size, then x·2 − 1.
    Raises ImportError naming the ``train`` extra when scikit-learn is missing.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("the digits data needs scikit-learn: pip install 'fastdiff[train]'") from None
    data = sk_load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    images = images * 2 - 1
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(labels) * HELD_OUT_FRACTION))
    idx = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
    return images[idx].contiguous(), labels[idx].contiguous()
