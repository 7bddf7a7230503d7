"""Image -> tensor transforms, built with timm's `create_transform`.

Tensors stay in [0, 1]: each backbone normalizes inside the model, so every consumer
(training, the Predictor, exported graphs) feeds the same input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from torch import Tensor

from lookcloser.config import DataConfig

IDENTITY_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
# The evaluation resize brings the shorter side to R = image_size / crop_pct and keeps the
# aspect ratio: a W:1 image becomes R x W*R pixels (a 1 x 2,000,000 strip, 256 x 512M). The
# longer side is first cut, centred, to this many times the shorter: the centre crop lies well
# inside the band, and no resized image holds more than MAX_RESIZE_ASPECT * R^2 pixels.
# Files beyond data/images.MAX_ASPECT_RATIO are refused when decoded; this bounds the rest.
MAX_RESIZE_ASPECT = 4.0
# timm's RandomErasing modes for the fills it has.
TIMM_ERASING_MODES = {"zero": "const", "noise": "pixel"}


def train_transform(cfg: DataConfig, interpolation: str = "bicubic") -> Callable:
    """Optional rotation, random-resized crop, flip, colour jitter, AutoAugment, erasing."""
    timm_erasing = cfg.erasing_fill in TIMM_ERASING_MODES
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=cfg.train_scale,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment,
        interpolation=interpolation,
        re_prob=cfg.random_erasing if timm_erasing else 0.0,
        re_mode=TIMM_ERASING_MODES.get(cfg.erasing_fill, "const"),
        **IDENTITY_NORM,
    )
    steps = list(transform.transforms)
    if cfg.rotation > 0:
        # timm has no rotation option; the FGVC recipes (DCL's among them) rotate first.
        steps.insert(0, T.RandomRotation(cfg.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if cfg.random_erasing > 0 and not timm_erasing:
        steps.append(MeanErasing(cfg.random_erasing))
    return T.Compose(steps)


class MeanErasing(torch.nn.Module):
    """Random erasing whose box is filled with the image's own per-channel mean.

    Written here because neither library has this fill: timm's RandomErasing fills with zeros
    or noise, torchvision's with a fixed value or noise. The box and its probability follow
    timm's defaults (area 2 % to 1/3 of the image, aspect ratio 0.3 to 3.3); the draws use
    torch's RNG, which the data path seeds per image.
    """

    def __init__(
        self,
        p: float,
        scale: tuple[float, float] = (0.02, 1 / 3),
        ratio: tuple[float, float] = (0.3, 1 / 0.3),
    ):
        super().__init__()
        self.p, self.scale, self.ratio = p, scale, ratio

    def forward(self, image: Tensor) -> Tensor:
        """The image (C x H x W), with one box set to its mean with probability p."""
        if torch.rand(1).item() >= self.p:
            return image
        mean = image.mean(dim=(-2, -1)).tolist()
        top, left, h, w, value = T.RandomErasing.get_params(image, self.scale, self.ratio, mean)
        if value is image:  # no box fitted in ten tries: torchvision leaves the image as is
            return image
        return TF.erase(image, top, left, h, w, value)


class CentralBand:
    """Cut the longer side of a PIL image, centred, to at most `max_ratio` times the shorter
    side (images within the ratio pass unchanged), so a later shorter-side resize is bounded."""

    def __init__(self, max_ratio: float = MAX_RESIZE_ASPECT):
        self.max_ratio = max_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = min(width, height)
        keep = math.ceil(short * self.max_ratio)
        if max(width, height) <= keep:
            return image
        if width > height:
            left = (width - keep) // 2
            return image.crop((left, 0, left + keep, height))
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio})"


def eval_transform(image_size: int, crop_pct: float, interpolation: str = "bicubic") -> Callable:
    """Resize to image_size / crop_pct, then centre-crop image_size (timm's), with the longer
    side first bounded by CentralBand."""
    transform = create_transform(
        input_size=image_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        **IDENTITY_NORM,
    )
    return T.Compose([CentralBand(), *transform.transforms])


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
