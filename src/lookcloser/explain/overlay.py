"""Heatmaps drawn over images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with a jet-coloured heatmap blended on top (heatmap resized to the image)."""
    from matplotlib import colormaps

    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(
        image.size, Image.BILINEAR
    )
    colored = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mixed = (1 - alpha) * base + alpha * colored
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def save_explanation(explanation, out: str | Path, scale: int = 2) -> Path:
    """Write the input view and its overlay side by side as a PNG."""
    view = explanation.image
    over = overlay(view, explanation.heatmap)
    w, h = view.size
    sheet = Image.new("RGB", (2 * w, h))
    sheet.paste(view, (0, 0))
    sheet.paste(over, (w, 0))
    if scale != 1:
        sheet = sheet.resize((2 * w * scale, h * scale), Image.NEAREST)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
