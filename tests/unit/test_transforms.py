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


# ---- augmentation presets and mean-filled erasing ----------------------------------------------
def test_inat21_preset_sets_its_keys_and_explicit_keys_win():
    from lookcloser.config import AUGMENTATION_PRESETS

    cfg = Config.load(None, ["data.preset=inat21"])
    for key, value in AUGMENTATION_PRESETS["inat21"].items():
        assert getattr(cfg.data, key) == value
    assert (cfg.data.rotation, cfg.data.random_erasing, cfg.data.erasing_fill) == (
        15.0,
        0.25,
        "mean",
    )
    # Explicit keys win, set before or after the preset; `none` puts the preset's keys back.
    cfg = Config.load(None, ["data.rotation=0", "data.preset=inat21", "data.color_jitter=0.1"])
    assert (cfg.data.rotation, cfg.data.color_jitter, cfg.data.random_erasing) == (0.0, 0.1, 0.25)
    cfg.apply_overrides(["data.preset=none"])
    assert (cfg.data.random_erasing, cfg.data.erasing_fill, cfg.data.color_jitter) == (
        0.0,
        "zero",
        0.1,
    )
    # A saved config reads back the same.
    saved = Config.load(None, ["data.preset=inat21", "data.hflip=0.2"]).to_dict()
    assert Config.from_dict(saved).to_dict() == saved


def test_erasing_fills_the_box_with_the_image_mean():
    from lookcloser.data.transforms import MeanErasing

    image = T.ToTensor()(_image())
    torch.manual_seed(0)
    erased = MeanErasing(1.0)(image.clone())
    changed = (erased != image).any(dim=0)
    assert 0 < int(changed.sum()) < changed.numel() / 3 + 64  # one box, at most a third
    rows, cols = changed.nonzero(as_tuple=True)
    box = erased[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    mean = image.mean(dim=(1, 2))
    assert torch.allclose(box, mean[:, None, None].expand_as(box))
    assert torch.equal(MeanErasing(0.0)(image), image)


def test_erasing_fill_picks_the_transform():
    from timm.data.random_erasing import RandomErasing

    from lookcloser.data.transforms import MeanErasing

    def steps(fill: str) -> list:
        cfg = Config().apply_overrides(
            ["data.image_size=32", "data.random_erasing=1.0", f"data.erasing_fill={fill}"]
        )
        return train_transform(cfg.data).transforms

    assert isinstance(steps("mean")[-1], MeanErasing)
    assert not any(isinstance(t, RandomErasing) for t in steps("mean"))
    zero = next(t for t in steps("zero") if isinstance(t, RandomErasing))
    noise = next(t for t in steps("noise") if isinstance(t, RandomErasing))
    assert (zero.mode, noise.mode) == ("const", "pixel")
    view = train_transform(
        Config()
        .apply_overrides(["data.image_size=32", "data.preset=inat21", "data.random_erasing=1.0"])
        .data
    )(_image())
    assert view.shape == (3, 32, 32)
