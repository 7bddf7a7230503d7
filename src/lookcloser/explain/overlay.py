"""Heatmaps drawn over images, and the explanation figure saved by `lookcloser explain`."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lookcloser.fileio import atomic_path, safe_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CMAP = "jet"  # the overlay's colormap; the figure's colour bar uses the same one
# PNG text chunk naming the image an explanation was made from (its resolved path).
INPUT_KEY = "lookcloser.input"


def literal_text(draw):
    """Run a figure-drawing function with mathtext off: class names, labels and paths are data,
    and a `$` in one is a dollar sign (an unbalanced `$x^{$` would fail the whole figure)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib as mpl

        with mpl.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with a jet-coloured heatmap blended on top (heatmap resized to the image)."""
    from matplotlib import colormaps

    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(
        image.size, Image.BILINEAR
    )
    colored = colormaps[CMAP](np.asarray(heat) / 255.0)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mixed = (1 - alpha) * base + alpha * colored
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def explanation_title(explanation, map_name: str | None = None) -> str:
    """The figure's title line: the explained class, its probability and the map, if named."""
    title = f"explained: {explanation.class_name} (p = {explanation.prob:.3f})"
    if map_name:
        title += f"  ·  map: {map_name}"
    return title


@literal_text
def explanation_figure(explanation, map_name: str | None = None) -> Figure:
    """Input view, overlay and a 0-1 colour bar under a title naming the class and probability.

    The figure is not registered with pyplot (nothing to close, no display needed). Its size in
    inches is fixed, so the text reads the same for a 64 px and a 448 px input view.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    view = explanation.image.convert("RGB")
    map_name = map_name or getattr(explanation, "map_name", "") or None
    w, h = view.size
    panels = [
        (view, f"input ({w} x {h} px)"),
        (overlay(view, explanation.heatmap), f"{map_name or 'attention'} overlay"),
    ]
    # Images the method made from the input (TASN's sampled view), shown at their own size.
    for name, picture in getattr(explanation, "views", {}).items():
        panels.append((picture.convert("RGB"), f"{name} ({picture.width} x {picture.height} px)"))
    # Layout in inches: [pad | panel | gap | panel ... | gap | bar | tick labels], title on top.
    side = 3.2  # the longer side of each picture (~480 px at the default 150 dpi)
    pw, ph = (side, side * h / w) if w >= h else (side * w / h, side)
    title = textwrap.fill(explanation_title(explanation, map_name), 70)
    pad, gap, bar_gap, bar_w, right = 0.15, 0.12, 0.15, 0.16, 0.85
    top = 0.35 + 0.22 * title.count("\n") + 0.3  # title line(s), then the panel titles
    bottom = 0.15
    n = len(panels)
    fw = pad + n * pw + (n - 1) * gap + bar_gap + bar_w + right
    fh = bottom + ph + top
    fig = Figure(figsize=(fw, fh))

    def box(x: float, width: float) -> list[float]:
        return [x / fw, bottom / fh, width / fw, ph / fh]

    for i, (picture, name) in enumerate(panels):
        ax = fig.add_axes(box(pad + i * (pw + gap), pw))
        ax.imshow(picture, interpolation="antialiased")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    ax_bar = fig.add_axes(box(pad + n * pw + (n - 1) * gap + bar_gap, bar_w))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), CMAP), cax=ax_bar)
    bar.set_ticks([0, 0.5, 1], labels=["0 low", "0.5", "1 high"])
    bar.ax.tick_params(labelsize=8)
    bar.set_label("attention", fontsize=9, labelpad=2)
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / fh, va="top")
    return fig


def save_explanation(
    explanation,
    out: str | Path,
    scale: int = 2,
    map_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the explanation figure (view, overlay, colour bar, class and probability) as a PNG.

    `scale` sets the resolution: 75 dpi per step (the default 2 gives 150 dpi); `metadata`:
    PNG text chunks (e.g. the input image's path).
    """
    fig = explanation_figure(explanation, map_name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Beside `out`, then moved over it: a link at `out` is replaced, never written through.
        with atomic_path(out) as tmp:
            fig.savefig(
                tmp, format="png", dpi=75 * max(1, scale), facecolor="white", metadata=metadata
            )
    finally:
        fig.clear()
    return out


def explained_input(image: str | Path) -> str:
    """What an explanation PNG records of its input: the resolved path, as printable text."""
    # backslashreplace: a file name that is not valid UTF-8 still gives one stable text.
    return str(Path(image).resolve()).encode("utf-8", "backslashreplace").decode("utf-8")


def recorded_input(png: Path) -> str | None:
    """The input an explanation PNG records; None when there is no such regular PNG file."""
    try:
        # lstat: a link (or a FIFO, a device) is never opened, only replaced.
        if not stat.S_ISREG(os.lstat(png).st_mode):
            return None
        with Image.open(png) as picture:  # reads the header chunks only, never the pixels
            value = picture.info.get(INPUT_KEY)
    except Exception:  # missing, unreadable, not a PNG: nothing recorded
        return None
    return value if isinstance(value, str) else None


def default_explanation_path(folder: str | Path, image: str | Path, name: str) -> Path:
    """`folder/<name>.png`, unless that file explains another image: then
    `folder/<name>-<8 hex digits of the image's resolved path>.png` (the same on every run)."""
    folder = Path(folder)
    name = safe_name(name, 200)
    mine = explained_input(image)
    plain = folder / f"{name}.png"
    if recorded_input(plain) in (None, mine):
        return plain
    digest = hashlib.sha256(mine.encode("utf-8")).hexdigest()[:8]
    return folder / f"{name}-{digest}.png"
