"""Image -> tensor transforms, built with timm's `create_transform`.

Tensors stay in [0, 1]: each backbone normalizes inside the model, so every consumer
(training, the Predictor, exported graphs) feeds the same input.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision.transforms as T
from timm.data import create_transform

from lookcloser.config import DataConfig

IDENTITY_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def train_transform(cfg: DataConfig, interpolation: str = "bicubic") -> Callable:
    """Optional rotation, random-resized crop, flip, colour jitter, AutoAugment, erasing."""
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=cfg.train_scale,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment,
        interpolation=interpolation,
        re_prob=cfg.random_erasing,
        **IDENTITY_NORM,
    )
    if cfg.rotation > 0:
        # timm has no rotation option; the FGVC recipes (DCL's among them) rotate first.
        rotate = T.RandomRotation(cfg.rotation, interpolation=T.InterpolationMode.BILINEAR)
        transform = T.Compose([rotate, *transform.transforms])
    return transform


def eval_transform(image_size: int, crop_pct: float, interpolation: str = "bicubic") -> Callable:
    """Resize to image_size / crop_pct, then centre-crop image_size."""
    return create_transform(
        input_size=image_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        **IDENTITY_NORM,
    )
