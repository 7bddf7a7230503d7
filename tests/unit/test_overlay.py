"""The explanation PNG: input view, overlay, colour bar, and a title naming class and probability."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from lookcloser.explain.overlay import (
    explanation_figure,
    explanation_title,
    overlay,
    save_explanation,
)
from lookcloser.predictor import Explanation


def _explanation(size: int, class_name: str = "class_03", prob: float = 0.91234) -> Explanation:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, np.full_like(xx, 0.5)], axis=-1)
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    heatmap = np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05)[::8, ::8]  # coarse, like a CAM
    return Explanation(image, heatmap, class_name, prob)


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_title_names_class_probability_and_map():
    e = _explanation(64)
    assert explanation_title(e) == "explained: class_03 (p = 0.912)"
    assert "map: region-alignment" in explanation_title(e, "region-alignment")


@pytest.mark.parametrize("size", [64, 448])
def test_saved_png_is_a_figure_larger_than_the_bare_pair(tmp_path, size):
    open_before = plt.get_fignums()
    out = save_explanation(_explanation(size), tmp_path / "sub" / "heat.png", map_name="grad-cam")
    assert out == tmp_path / "sub" / "heat.png" and out.is_file()
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 2 * size and height > size  # the bare view + overlay pair, plus title and bar
    assert width >= 2 * 448 and height >= 448  # each panel at least as large as a 448 px view
    assert plt.get_fignums() == open_before  # nothing left open


def test_same_size_for_small_and_large_views(tmp_path):
    small = save_explanation(_explanation(64), tmp_path / "small.png")
    large = save_explanation(_explanation(448), tmp_path / "large.png")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.size == b.size


@pytest.mark.parametrize("size", [64, 448])
def test_figure_has_views_colour_bar_and_title(size):
    open_before = plt.get_fignums()
    fig = explanation_figure(_explanation(size, "Black_footed_Albatross", 0.5), "grad-cam")
    assert len(fig.axes) >= 3  # input view, overlay, colour bar
    assert fig.get_suptitle() == "explained: Black_footed_Albatross (p = 0.500)  ·  map: grad-cam"
    bar = fig.axes[-1]
    assert bar.get_ylim() == pytest.approx((0, 1))
    assert "attention" in bar.get_ylabel()
    texts = _texts(fig)
    assert "0 low" in texts and "1 high" in texts
    assert "grad-cam overlay" in texts
    assert plt.get_fignums() == open_before  # built without pyplot


def test_long_title_wraps():
    fig = explanation_figure(_explanation(64, "Chevrolet Silverado 2500HD Regular Cab 2012 " * 2))
    assert "\n" in fig.get_suptitle()


def test_non_square_view(tmp_path):
    e = _explanation(64)
    e.image = e.image.resize((96, 64))
    out = save_explanation(e, tmp_path / "wide.png")
    with Image.open(out) as image:
        assert image.size[0] > image.size[1]


def test_overlay_unchanged():
    """overlay(): same size as the image; zero weight gives the image back."""
    e = _explanation(64)
    blended = overlay(e.image, e.heatmap)
    assert blended.size == e.image.size and blended.mode == "RGB"
    assert np.array_equal(np.asarray(overlay(e.image, e.heatmap, alpha=0.0)), np.asarray(e.image))
    hot = np.asarray(overlay(e.image, np.ones((4, 4)), alpha=1.0))
    assert (hot[..., 0] > 100).all() and (hot[..., 2] < 10).all()  # jet at 1: dark red
