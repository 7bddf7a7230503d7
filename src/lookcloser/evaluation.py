"""Metrics of a classifier on a labelled split: top-1/5, mean per-class accuracy, ECE, confusion."""

from __future__ import annotations

import csv
import logging
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from lookcloser.explain.overlay import literal_text
from lookcloser.fileio import atomic_open, atomic_path

log = logging.getLogger(__name__)

# The top-1 probability at and above which predictions are this often right, recorded with the
# metrics of each split; `lookcloser serve` flags answers below the val split's as unsure.
CONFIDENCE_ACCURACY = 0.9
CONFIDENCE_KEY = "confidence_for_90pct_accuracy"
# Why a split records no threshold (CONFIDENCE_KEY is then None): too few images.
CONFIDENCE_NOTE_KEY = "confidence_note"
# The fewest images a threshold is set from. The threshold is the last point down the answers,
# most confident first, where their running accuracy is still 90 %, so one answer moves that
# accuracy by 1/n: on 8 images by 12.5 points, and if the most confident answer is wrong no
# prefix ever reaches 90 % and the threshold is 1.0 (every answer unsure). At 30 one answer is
# 3.3 points and the binomial standard error of a 90 % accuracy is 5.5 points
# (sqrt(0.9 * 0.1 / 30)): rough but usable. It is a count of answers, not per class: the
# threshold is one number over all of them (CUB-200's 10 % val split, 3 images a class, still
# gives about 600 answers).
MIN_CONFIDENCE_IMAGES = 30


def confidence_threshold(probs: Tensor, labels: Tensor, accuracy: float = 0.9) -> float:
    """The lowest top-1 probability t such that the predictions with top-1 probability >= t are
    right at least `accuracy` of the time (the most images kept at that accuracy); 1.0 when no
    such set exists (every answer would be unsure), 0.0 for an empty split."""
    if labels.numel() == 0:
        return 0.0
    confidence, predicted = probs.max(dim=1)
    order = confidence.argsort(descending=True, stable=True)
    right = (predicted[order] == labels[order]).float()
    running = right.cumsum(0) / torch.arange(1, len(right) + 1)
    meets = (running >= accuracy).nonzero()
    if len(meets) == 0:
        return 1.0
    return float(confidence[order][meets.max()])


def threshold_note(images: int, split: str | None = None) -> str | None:
    """Why a split of `images` images sets no unsure threshold; None when it is large enough."""
    if images >= MIN_CONFIDENCE_IMAGES:
        return None
    what = f"{split} split of {images} images" if split else f"{images} images"
    return (
        f"{what}: too small to set an unsure threshold "
        f"(needs at least {MIN_CONFIDENCE_IMAGES} images)"
    )


def compute_metrics(
    logits: Tensor,
    labels: Tensor,
    classes: list[str],
    top_pairs: int = 10,
    split: str | None = None,
) -> dict[str, Any]:
    """Top-1, top-k (k = min(5, classes)), mean per-class accuracy, ECE (15 bins), the
    confidence threshold for 90 % accuracy (`confidence_threshold`; None, with the reason
    under CONFIDENCE_NOTE_KEY, on fewer than MIN_CONFIDENCE_IMAGES images) and the
    most-confused class pairs. `split` names the split in that reason."""
    n = len(classes)
    probs = logits.float().softmax(dim=1)
    k = min(5, n)
    top1 = MulticlassAccuracy(num_classes=n, average="micro")(probs, labels)
    top5 = MulticlassAccuracy(num_classes=n, average="micro", top_k=k)(probs, labels)
    # Mean over the classes present in this split (absent classes would count as 0).
    per_class = MulticlassAccuracy(num_classes=n, average=None)(probs, labels)
    present = torch.bincount(labels, minlength=n) > 0
    mean_per_class = per_class[present].mean()
    ece = MulticlassCalibrationError(num_classes=n, n_bins=15, norm="l1")(probs, labels)
    confusion = MulticlassConfusionMatrix(num_classes=n)(probs, labels)
    note = threshold_note(int(labels.numel()), split)
    threshold = (
        {CONFIDENCE_KEY: None, CONFIDENCE_NOTE_KEY: note}
        if note
        else {CONFIDENCE_KEY: confidence_threshold(probs, labels, CONFIDENCE_ACCURACY)}
    )
    return {
        "images": int(labels.numel()),
        "classes": n,
        "top1": float(top1),
        f"top{k}": float(top5),
        "mean_per_class_accuracy": float(mean_per_class),
        "ece": float(ece),
        **threshold,
        "most_confused": most_confused(confusion, classes, top_pairs),
        "confusion": confusion.tolist(),
    }


def most_confused(confusion: Tensor, classes: list[str], limit: int = 10) -> list[dict[str, Any]]:
    """Off-diagonal (true, predicted) pairs with the most images, largest first."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().sort(descending=True, stable=True)
    pairs = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        if value == 0 or len(pairs) >= limit:
            break
        true, pred = divmod(index, len(classes))
        pairs.append({"true": classes[true], "predicted": classes[pred], "count": int(value)})
    return pairs


# Tick labels longer than this many columns (a CJK character takes two) end in an ellipsis.
MAX_LABEL_COLUMNS = 24
# Fonts with CJK glyphs, the first installed one used after DejaVu Sans (matplotlib falls back
# glyph by glyph through the list): class names in Chinese, Japanese or Korean render as text.
CJK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "IPAexGothic",
    "IPAGothic",
    "TakaoGothic",
)
_said_missing_glyphs = False
_GLYPH = re.compile(r"Glyph (\d+) ")


def label_fonts() -> list[str]:
    """The font families the confusion plot uses: DejaVu Sans, then an installed CJK font."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *[name for name in CJK_FONTS if name in installed][:1]]


def _width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def columns_of(text: str) -> int:
    """Display columns of `text`: wide (CJK) characters count two."""
    return sum(_width(ch) for ch in text)


def short_label(name: str, columns: int = MAX_LABEL_COLUMNS) -> str:
    """`name` cut to `columns` display columns (wide characters count two), with an ellipsis."""
    if columns_of(name) <= columns:
        return name
    kept, used = [], 1  # the ellipsis takes one column
    for ch in name:
        if used + _width(ch) > columns:
            break
        kept.append(ch)
        used += _width(ch)
    return "".join(kept).rstrip() + "\u2026"


@literal_text
def write_confusion(
    confusion: list[list[int]], classes: list[str], out_dir: str | Path
) -> tuple[Path, Path]:
    """confusion.csv (rows: true class, columns: predicted) and confusion.png (class names cut
    to MAX_LABEL_COLUMNS, in a CJK-capable font when one is installed)."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "confusion.csv"
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion, strict=True):
            writer.writerow([name, *row])
    png_path = out_dir / "confusion.png"
    import matplotlib as mpl

    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"Glyph \d+ .* missing from font")
        with mpl.rc_context({"font.family": label_fonts()}):
            fig = confusion_figure(confusion, classes)
            try:
                with atomic_path(png_path) as tmp:
                    fig.savefig(tmp, format="png", dpi=100)
            finally:
                fig.clear()
    _say_missing_glyphs(caught)
    return csv_path, png_path


def _say_missing_glyphs(caught: list[warnings.WarningMessage]) -> None:
    # matplotlib warns once per missing character; one line per process says it instead.
    global _said_missing_glyphs
    missing = [w for w in caught if "missing from font" in str(w.message)]
    for w in caught:
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing and not _said_missing_glyphs:
        _said_missing_glyphs = True
        chars = sorted(
            {chr(int(m.group(1))) for w in missing if (m := _GLYPH.match(str(w.message)))}
        )
        log.warning(
            "confusion.png: no installed font has %d character(s) of the class names (%s); they "
            "show as boxes (a CJK font such as Noto Sans CJK is used when installed)",
            len(chars),
            "".join(chars[:10]),
        )


def confusion_figure(confusion: list[list[int]], classes: list[str]):
    """The confusion matrix as a matplotlib Figure (not pyplot: no display backend needed,
    nothing left open): shares of the true class as colour, counts as numbers when few."""
    from matplotlib.figure import Figure

    n = len(classes)
    labels = [short_label(name) for name in classes]
    size = min(4 + 0.35 * n, 40)
    # Room for the longest tick label (7 pt: about 0.06 inch a column) beside and below.
    margin = 0.06 * max((columns_of(label) for label in labels), default=0)
    fig = Figure(figsize=(size + 1.6 + margin, size + margin), layout="constrained")
    ax = fig.add_subplot()
    matrix = torch.tensor(confusion, dtype=torch.float32)
    normalized = matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    image = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    numbers = n <= 25
    if numbers:
        for i in range(n):
            for j in range(n):
                if confusion[i][j]:
                    color = "white" if normalized[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, confusion[i][j], ha="center", va="center", fontsize=7, color=color
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    what = "numbers: image counts; " if numbers else ""
    ax.set_title(f"confusion matrix\n({what}colour: share of the true class)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's images\n(each row sums to 1)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics only (no matrix, no pair list)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
