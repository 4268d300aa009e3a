"""A small CNN digit classifier: scores generated digits (``fastdiff eval``) and supplies the features for the
Fréchet distance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.models.modeling import ModelMixin, build_config, normalize_config
from fastdiff.validation import check_positive_int


@dataclass
class DigitClassifierConfig:
    in_channels: int = 1  # image channels
    image_size: int = 16  # input height = width
    width: int = 32  # channels of the first conv; doubled after each pooling
    feature_dim: int = 64  # penultimate features (used for the Fréchet distance)
    num_classes: int = 10

    def __post_init__(self):
        normalize_config(self)  # plain Python ints (numpy integers are accepted and stored as int)
        for name in ("in_channels", "width", "feature_dim", "num_classes"):
            check_positive_int(name, getattr(self, name))
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4 (the classifier pools twice), "
                             f"got {self.image_size}")


class DigitClassifier(ModelMixin):
    """(B, 1, 16, 16) images in [−1, 1] → logits (B, num_classes); ``features(x)`` → (B, feature_dim)."""

    config_class = DigitClassifierConfig

    def __init__(self, config: Optional[DigitClassifierConfig] = None, **overrides):
        super().__init__()
        cfg = self.config = build_config(DigitClassifierConfig, config, overrides)
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.in_channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * (cfg.image_size // 4) ** 2, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 2w, 4, 4)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
