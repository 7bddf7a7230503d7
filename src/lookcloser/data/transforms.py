"""Image -> tensor transforms, built with timm's `create_transform`.

Tensors stay in [0, 1]: each backbone normalizes inside the model, so every consumer
(training, the Predictor, exported graphs) feeds the same input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
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


class TwoViews:
    """Two augmentations of one image, stacked (2 x 3 x H x W): a weak and a strong view.

    The unlabelled stream of `semi.strategy=fixmatch` uses it; the datamodule splits the
    stack into `Batch.unlabelled` and `Batch.unlabelled_strong`. Both views come from the
    image's own seed (drawn one after the other), so they are reproducible.
    """

    def __init__(self, weak: Callable, strong: Callable):
        self.weak = weak
        self.strong = strong

    def __call__(self, image):
        return torch.stack([self.weak(image), self.strong(image)])


def strong_transform(
    cfg: DataConfig, auto_augment: str, erasing: float, interpolation: str = "bicubic"
) -> Callable:
    """The training transform with a timm auto-augment policy (e.g. RandAugment) and random
    erasing on top: FixMatch's strong view."""
    return train_transform(
        replace(cfg, auto_augment=auto_augment, random_erasing=erasing), interpolation
    )
