"""Train and eval transforms: timm's, plus the rotation the FGVC recipes use."""

from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image

from lookcloser.config import Config
from lookcloser.data.transforms import eval_transform, train_transform


def _image() -> Image.Image:
    gradient = torch.linspace(0, 255, 64).repeat(64, 1).to(torch.uint8)
    return Image.fromarray(torch.stack([gradient, gradient.T, gradient], dim=-1).numpy())


def test_rotation_is_off_by_default_and_first_when_on():
    cfg = Config().apply_overrides(["data.image_size=32"])
    assert not any(isinstance(t, T.RandomRotation) for t in train_transform(cfg.data).transforms)
    cfg.apply_overrides(["data.rotation=15"])
    first = train_transform(cfg.data).transforms[0]
    assert isinstance(first, T.RandomRotation) and list(first.degrees) == [-15.0, 15.0]


def test_rotation_changes_the_view_and_is_seeded():
    cfg = Config().apply_overrides(
        [
            "data.image_size=32",
            "data.rotation=30",
            "data.hflip=0.0",
            "data.color_jitter=0.0",
            "data.train_scale=[1.0,1.0]",
        ]
    )
    plain = Config().apply_overrides(
        [
            "data.image_size=32",
            "data.hflip=0.0",
            "data.color_jitter=0.0",
            "data.train_scale=[1.0,1.0]",
        ]
    )
    views = []
    for transform in (
        train_transform(cfg.data),
        train_transform(cfg.data),
        train_transform(plain.data),
    ):
        torch.manual_seed(3)
        views.append(transform(_image()))
    assert torch.equal(views[0], views[1])  # same seed, same rotation
    assert not torch.allclose(views[0], views[2])  # rotated differs from unrotated


def test_outputs_are_unnormalized_rgb_of_the_configured_size():
    cfg = Config().apply_overrides(["data.image_size=40"])
    for transform in (train_transform(cfg.data), eval_transform(40, 0.875)):
        x = transform(_image())
        assert x.shape == (3, 40, 40) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
