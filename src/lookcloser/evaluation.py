"""Metrics of a classifier on a labelled split: top-1/5, mean per-class accuracy, ECE, confusion.

Everything is accumulated batch by batch (`StreamingMetrics`) from counts: per-class hits and
totals, per-bin calibration sums, one top-1 confidence and one correctness bit per image (for the
unsure threshold) and a sparse table of (true, predicted) pairs (`ConfusionCounts`). Memory is
linear in images and classes, never images x classes or classes x classes; the figures are the
ones torchmetrics' MulticlassAccuracy / MulticlassCalibrationError / MulticlassConfusionMatrix
gave on the whole split at once (checked in tests/unit/test_streaming_metrics.py).
"""

from __future__ import annotations

import csv
import logging
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lookcloser.arrays import GrowingArray
from lookcloser.errors import DataError
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
# Expected calibration error: 15 equal-width bins of the top-1 probability, L1 (as
# MulticlassCalibrationError(n_bins=15, norm="l1")).
ECE_BINS = 15
# Up to this many classes the metrics carry the dense confusion matrix ("confusion", a list of
# lists) and confusion.csv is the square table (200 classes: a 40,000-cell table, about 100 KB);
# above it only the sparse counts, and confusion.csv lists the nonzero cells (true, predicted,
# count): at 10,000 classes the square table was 200 MB of mostly zeros.
DENSE_CONFUSION_CLASSES = 200
# confusion.png draws the whole matrix up to this many classes (the most that still get a
# readable tick label each); above it, the block of the most-confused classes.
READABLE_CONFUSION_CLASSES = 60
# The most classes in that block (each pair brings at most two).
CONFUSED_BLOCK_CLASSES = 30
# ConfusionCounts folds the codes of new images into its sorted table once this many are
# waiting (or as many as the table has cells): each image is sorted O(log) times overall.
_MERGE_AT = 1 << 16


def _as_int64(values: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


class ConfusionCounts:
    """Image counts of (true, predicted) class pairs, nonzero cells only: memory grows with the
    number of distinct pairs seen (at most the number of images), never classes x classes."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        # Cell codes true * C + predicted (the row-major flat index), sorted and unique, with
        # their counts; new images' codes wait in _pending until the next merge.
        self._codes = np.empty(0, dtype=np.int64)
        self._counts = np.empty(0, dtype=np.int64)
        self._pending = GrowingArray(np.int64, capacity=1024)

    @classmethod
    def from_dense(
        cls, confusion: Tensor | np.ndarray | Sequence[Sequence[int]]
    ) -> ConfusionCounts:
        """The counts of a dense square matrix (rows: true class, columns: predicted)."""
        matrix = np.asarray(
            confusion.detach().cpu().numpy() if isinstance(confusion, Tensor) else confusion,
            dtype=np.int64,
        )
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
        counts = cls(matrix.shape[0])
        flat = matrix.reshape(-1)
        codes = np.flatnonzero(flat)
        counts._codes, counts._counts = codes.astype(np.int64), flat[codes]
        return counts

    def update(self, true: Tensor | np.ndarray, pred: Tensor | np.ndarray) -> None:
        """Count one image per (true[i], pred[i]) pair."""
        true, pred = _as_int64(true), _as_int64(pred)
        if true.shape != pred.shape:
            raise ValueError(f"{len(true)} true classes but {len(pred)} predicted ones")
        if len(true) == 0:
            return
        for name, values in (("true", true), ("predicted", pred)):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise DataError(
                    f"{name} class index {bad} is outside the {self.num_classes} classes "
                    f"(expected 0 to {self.num_classes - 1})"
                )
        self._pending.extend(true * self.num_classes + pred)
        if self._pending.size >= max(_MERGE_AT, len(self._codes)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending.size:
            return
        new, times = np.unique(self._pending.view(), return_counts=True)
        self._pending.clear()
        codes = np.concatenate([self._codes, new])
        counts = np.concatenate([self._counts, times.astype(np.int64)])
        order = np.argsort(codes, kind="stable")
        codes, counts = codes[order], counts[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        self._codes, self._counts = codes[starts], np.add.reduceat(counts, starts)

    @property
    def images(self) -> int:
        """The number of images counted."""
        self._merge()
        return int(self._counts.sum())

    def __len__(self) -> int:
        """The number of nonzero cells."""
        self._merge()
        return len(self._codes)

    def __repr__(self) -> str:
        return f"ConfusionCounts({self.num_classes} classes, {len(self)} nonzero cells)"

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true, predicted, count) int64 arrays of the nonzero cells, in row-major order."""
        self._merge()
        true, pred = np.divmod(self._codes, self.num_classes)
        return true, pred, self._counts.copy()

    def row_totals(self) -> np.ndarray:
        """Images per true class (int64, one per class)."""
        true, _, counts = self.cells()
        totals = np.zeros(self.num_classes, dtype=np.int64)
        np.add.at(totals, true, counts)
        return totals

    def dense(self, max_classes: int = DENSE_CONFUSION_CLASSES) -> list[list[int]]:
        """The square matrix as lists (rows: true class); for small class counts only."""
        if self.num_classes > max_classes:
            raise ValueError(
                f"a dense confusion matrix of {self.num_classes} classes "
                f"({self.num_classes**2} cells) is over the {max_classes}-class limit: "
                "use cells() or most_confused()"
            )
        matrix = np.zeros(self.num_classes * self.num_classes, dtype=np.int64)
        self._merge()
        matrix[self._codes] = self._counts
        return matrix.reshape(self.num_classes, self.num_classes).tolist()

    def ranked_pairs(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Off-diagonal (true, predicted, count) cells, most images first; ties in row-major
        order (as a stable descending sort of the flattened matrix gives them)."""
        self._merge()
        true, pred = np.divmod(self._codes, self.num_classes)
        off = true != pred
        codes, counts = self._codes[off], self._counts[off]
        if limit is not None:
            if limit <= 0:
                codes, counts = codes[:0], counts[:0]
            elif len(counts) > limit:
                # Only the cells at or above the limit-th largest count can make the list:
                # O(cells) selection instead of sorting them all.
                kth = np.partition(counts, len(counts) - limit)[len(counts) - limit]
                keep = counts >= kth
                codes, counts = codes[keep], counts[keep]
        order = np.lexsort((codes, -counts))[:limit]
        true, pred = np.divmod(codes[order], self.num_classes)
        return true, pred, counts[order]

    def most_confused(self, classes: Sequence[str], limit: int = 10) -> list[dict[str, Any]]:
        """Off-diagonal (true, predicted) pairs with the most images, largest first."""
        self._check_classes(classes)
        true, pred, counts = self.ranked_pairs(limit)
        return [
            {"true": classes[t], "predicted": classes[p], "count": int(c)}
            for t, p, c in zip(true.tolist(), pred.tolist(), counts.tolist(), strict=True)
        ]

    def confused_block(self, size: int = CONFUSED_BLOCK_CLASSES) -> list[int]:
        """Indices (ascending) of the classes of the most-confused pairs, taken largest pair
        first while both its classes fit in `size`; empty when no image was confused."""
        true, pred, _ = self.ranked_pairs()
        block: set[int] = set()
        for pair in zip(true.tolist(), pred.tolist(), strict=True):
            new = block | set(pair)
            if len(new) > size:
                break
            block = new
        return sorted(block)

    def _check_classes(self, classes: Sequence[str]) -> None:
        if len(classes) != self.num_classes:
            raise ValueError(
                f"{len(classes)} class names for a confusion table of {self.num_classes} classes"
            )


def _threshold_of(confidence: Tensor, right: Tensor, accuracy: float) -> float:
    """`confidence_threshold` from each image's top-1 probability and whether it was right."""
    if right.numel() == 0:
        return 0.0
    order = confidence.argsort(descending=True, stable=True)
    # The running count in int64 (float32 counts stop being exact past 2**24 images), divided
    # in float32 as before, so the threshold is the same figure as it always was.
    hits = right[order].long().cumsum(0).float()
    running = hits / torch.arange(1, len(right) + 1)
    meets = (running >= accuracy).nonzero()
    if len(meets) == 0:
        return 1.0
    return float(confidence[order][meets.max()])


def confidence_threshold(probs: Tensor, labels: Tensor, accuracy: float = 0.9) -> float:
    """The lowest top-1 probability t such that the predictions with top-1 probability >= t are
    right at least `accuracy` of the time (the most images kept at that accuracy); 1.0 when no
    such set exists (every answer would be unsure), 0.0 for an empty split."""
    if labels.numel() == 0:
        return 0.0
    confidence, predicted = probs.max(dim=1)
    return _threshold_of(confidence, predicted == labels, accuracy)


def threshold_note(images: int, split: str | None = None) -> str | None:
    """Why a split of `images` images sets no unsure threshold; None when it is large enough."""
    if images >= MIN_CONFIDENCE_IMAGES:
        return None
    what = f"{split} split of {images} images" if split else f"{images} images"
    return (
        f"{what}: too small to set an unsure threshold "
        f"(needs at least {MIN_CONFIDENCE_IMAGES} images)"
    )


def _float32_ratio(num: Tensor | int, den: Tensor | int) -> Tensor:
    # torchmetrics divides its integer counts as float32 (_safe_divide); so do we, so that a
    # figure is the very number it gave (and a 0/0 class is 0, as there).
    num, den = torch.as_tensor(num).float(), torch.as_tensor(den).float()
    return torch.where(den != 0, num / den, torch.zeros((), dtype=num.dtype))


class StreamingMetrics:
    """The metrics of `compute_metrics`, accumulated batch by batch: `update(logits, labels)`
    per batch (logits or log-probabilities, B x C), then `compute()`. Each update costs
    O(batch x classes); what is kept is O(classes + images + confused pairs)."""

    def __init__(self, classes: Sequence[str], top_pairs: int = 10):
        self.classes = list(classes)
        n = len(self.classes)
        if n < 1:
            raise ValueError("StreamingMetrics needs at least one class")
        self.top_pairs = top_pairs
        self.k = min(5, n)
        self.per_class_totals = np.zeros(n, dtype=np.int64)
        self.per_class_hits = np.zeros(n, dtype=np.int64)
        self.topk_hits = 0
        self.confusion = ConfusionCounts(n)
        # MulticlassCalibrationError's bins: bucketize on linspace(0, 1, 16) (float32, as the
        # confidences), right=True, minus 1, so 16 slots with the last for confidence 1.0.
        self._boundaries = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float32)
        self._bin_count = np.zeros(ECE_BINS + 1, dtype=np.int64)
        self._bin_confidence = np.zeros(ECE_BINS + 1, dtype=np.float64)
        self._bin_right = np.zeros(ECE_BINS + 1, dtype=np.int64)
        # One float32 and one bool per image, for the unsure threshold (it ranks every answer).
        self._confidence = GrowingArray(np.float32)
        self._right = GrowingArray(np.bool_)

    @property
    def images(self) -> int:
        """Images seen so far."""
        return int(self.per_class_totals.sum())

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add one batch: `logits` B x C (logits or log-probabilities), `labels` B class indices."""
        n = len(self.classes)
        if logits.ndim != 2 or logits.shape[1] != n:
            raise DataError(
                f"model outputs of shape {tuple(logits.shape)} for {n} classes "
                f"(expected batch x {n})"
            )
        if labels.ndim != 1 or len(labels) != len(logits):
            raise DataError(
                f"{tuple(labels.shape)} labels for {len(logits)} model outputs (expected one each)"
            )
        if len(labels) == 0:
            return
        with torch.no_grad():
            probs = logits.detach().float().softmax(dim=1)
            labels = labels.to(probs.device).long()
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= n:
                raise DataError(
                    f"label {low if low < 0 else high} is outside the {n} classes "
                    f"(expected 0 to {n - 1})"
                )
            # max(dim=1) as the calibration error takes it; on ties it is argmax's index (the
            # first), which the accuracy and the confusion matrix used.
            confidence, predicted = probs.max(dim=1)
            in_topk = (probs.topk(self.k, dim=1).indices == labels[:, None]).any(dim=1)
            bins = torch.bucketize(confidence, self._boundaries.to(probs.device), right=True) - 1
        confidence = confidence.cpu().numpy()
        predicted = predicted.cpu().numpy().astype(np.int64)
        true = labels.cpu().numpy().astype(np.int64)
        bins = bins.cpu().numpy()
        right = predicted == true
        self.per_class_totals += np.bincount(true, minlength=n)
        self.per_class_hits += np.bincount(true[right], minlength=n)
        self.topk_hits += int(in_topk.sum())
        slots = ECE_BINS + 1
        self._bin_count += np.bincount(bins, minlength=slots)
        self._bin_confidence += np.bincount(
            bins, weights=confidence.astype(np.float64), minlength=slots
        )
        self._bin_right += np.bincount(bins[right], minlength=slots)
        self.confusion.update(true, predicted)
        self._confidence.extend(confidence)
        self._right.extend(right)

    def ece(self) -> float:
        """Expected calibration error (15 bins, L1) of the images so far."""
        count = self._bin_count.astype(np.float64)
        seen = count > 0
        accuracy = np.divide(self._bin_right, count, out=np.zeros_like(count), where=seen)
        confidence = np.divide(self._bin_confidence, count, out=np.zeros_like(count), where=seen)
        return float(np.sum(np.abs(accuracy - confidence) * (count / count.sum())))

    def threshold(self, accuracy: float = CONFIDENCE_ACCURACY) -> float:
        """`confidence_threshold` over the images so far."""
        return _threshold_of(
            torch.from_numpy(self._confidence.view()),
            torch.from_numpy(self._right.view()),
            accuracy,
        )

    def compute(self, split: str | None = None) -> dict[str, Any]:
        """The metrics of the images so far (keys as `compute_metrics`); `split` names the
        split in messages."""
        images = self.images
        if images == 0:
            what = f"the {split} split" if split else "the metrics"
            raise DataError(f"{what}: no images to compute accuracy on")
        n = len(self.classes)
        top1 = _float32_ratio(int(self.per_class_hits.sum()), images)
        topk = _float32_ratio(self.topk_hits, images)
        # Mean over the classes present in this split (absent classes would count as 0).
        per_class = _float32_ratio(
            torch.from_numpy(self.per_class_hits), torch.from_numpy(self.per_class_totals)
        )
        mean_per_class = per_class[torch.from_numpy(self.per_class_totals > 0)].mean()
        note = threshold_note(images, split)
        threshold = (
            {CONFIDENCE_KEY: None, CONFIDENCE_NOTE_KEY: note}
            if note
            else {CONFIDENCE_KEY: self.threshold(CONFIDENCE_ACCURACY)}
        )
        metrics: dict[str, Any] = {
            "images": images,
            "classes": n,
            "top1": float(top1),
            f"top{self.k}": float(topk),
            "mean_per_class_accuracy": float(mean_per_class),
            "ece": self.ece(),
            **threshold,
            "most_confused": self.confusion.most_confused(self.classes, self.top_pairs),
        }
        if n <= DENSE_CONFUSION_CLASSES:
            metrics["confusion"] = self.confusion.dense()
        metrics["confusion_counts"] = self.confusion
        return metrics


def compute_metrics(
    logits: Tensor,
    labels: Tensor,
    classes: list[str],
    top_pairs: int = 10,
    split: str | None = None,
) -> dict[str, Any]:
    """Top-1, top-k (k = min(5, classes)), mean per-class accuracy, ECE (15 bins), the
    confidence threshold for 90 % accuracy (`confidence_threshold`; None, with the reason
    under CONFIDENCE_NOTE_KEY, on fewer than MIN_CONFIDENCE_IMAGES images), the most-confused
    class pairs and the confusion counts ("confusion_counts"; also dense as "confusion" up to
    DENSE_CONFUSION_CLASSES classes). `split` names the split in that reason."""
    metrics = StreamingMetrics(classes, top_pairs)
    metrics.update(logits, labels)
    return metrics.compute(split)


def stream_metrics(
    batches: Iterable[Any], classes: list[str], split: str | None = None
) -> dict[str, Any]:
    """`compute_metrics` of a split's outputs batch by batch (each with `.logits` and
    `.labels`, as `scoring.split_stream` yields them): memory flat in the number of images."""
    metrics = StreamingMetrics(classes)
    for batch in batches:
        metrics.update(batch.logits, batch.labels)
    return metrics.compute(split)


def most_confused(
    confusion: ConfusionCounts | Tensor | np.ndarray | Sequence[Sequence[int]],
    classes: list[str],
    limit: int = 10,
) -> list[dict[str, Any]]:
    """Off-diagonal (true, predicted) pairs with the most images, largest first (ties in
    row-major order), from a ConfusionCounts or a dense matrix."""
    if not isinstance(confusion, ConfusionCounts):
        confusion = ConfusionCounts.from_dense(confusion)
    return confusion.most_confused(classes, limit)


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
    confusion: ConfusionCounts | Sequence[Sequence[int]] | Tensor,
    classes: list[str],
    out_dir: str | Path,
) -> tuple[Path, Path]:
    """confusion.csv and confusion.png (class names cut to MAX_LABEL_COLUMNS, in a CJK-capable
    font when one is installed) from a ConfusionCounts or a dense matrix.

    Up to DENSE_CONFUSION_CLASSES classes the CSV is the square table (rows: true class,
    columns: predicted), above it one row per nonzero cell (`true,predicted,count`, class
    names). The PNG is the whole matrix up to READABLE_CONFUSION_CLASSES classes, above it the
    block of the most-confused classes (`ConfusionCounts.confused_block`)."""
    out_dir = Path(out_dir)
    n = len(classes)
    if isinstance(confusion, ConfusionCounts):
        counts = confusion
        counts._check_classes(classes)
        dense = counts.dense() if n <= DENSE_CONFUSION_CLASSES else None
    else:
        dense = confusion.tolist() if isinstance(confusion, Tensor) else confusion
        counts = None
        if n > READABLE_CONFUSION_CLASSES:  # the long CSV and the block figure read counts
            counts = ConfusionCounts.from_dense(dense)
            counts._check_classes(classes)
        if n > DENSE_CONFUSION_CLASSES:
            dense = None
    csv_path = out_dir / "confusion.csv"
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        if dense is not None:
            writer.writerow(["true\\predicted", *classes])
            for name, row in zip(classes, dense, strict=True):
                writer.writerow([name, *row])
        else:
            writer.writerow(["true", "predicted", "count"])
            true, pred, times = counts.cells()
            writer.writerows(
                (classes[t], classes[p], c)
                for t, p, c in zip(true.tolist(), pred.tolist(), times.tolist(), strict=True)
            )
    png_path = out_dir / "confusion.png"
    import matplotlib as mpl

    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"Glyph \d+ .* missing from font")
        with mpl.rc_context({"font.family": label_fonts()}):
            if n <= READABLE_CONFUSION_CLASSES:
                fig = confusion_figure(dense, classes)
            else:
                fig = confused_block_figure(counts, classes)
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


def confusion_figure(
    confusion: Sequence[Sequence[int]],
    classes: Sequence[str],
    *,
    row_totals: Sequence[int] | None = None,
    title: str = "confusion matrix",
):
    """The confusion matrix as a matplotlib Figure (not pyplot: no display backend needed,
    nothing left open): shares of the true class as colour, counts as numbers when few.

    `row_totals` (images of each row's true class) when the matrix is a block of a larger one:
    the colour is then the share of all the class's images, and rows need not sum to 1."""
    from matplotlib.figure import Figure

    n = len(classes)
    labels = [short_label(name) for name in classes]
    size = min(4 + 0.35 * n, 40)
    # Room for the longest tick label (7 pt: about 0.06 inch a column) beside and below.
    margin = 0.06 * max((columns_of(label) for label in labels), default=0)
    fig = Figure(figsize=(size + 1.6 + margin, size + margin), layout="constrained")
    ax = fig.add_subplot()
    matrix = torch.tensor(confusion, dtype=torch.float32).reshape(n, n)
    totals = (
        matrix.sum(dim=1, keepdim=True)
        if row_totals is None
        else torch.tensor(row_totals, dtype=torch.float32).reshape(n, 1)
    )
    normalized = matrix / totals.clamp_min(1)
    image = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= READABLE_CONFUSION_CLASSES:
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
    ax.set_title(f"{title}\n({what}colour: share of the true class)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    rows = (
        "(each row sums to 1)"
        if row_totals is None
        else "(of all its images: a row of the\nblock need not sum to 1)"
    )
    bar.set_label(f"share of the true class's images\n{rows}", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def confused_block_figure(counts: ConfusionCounts, classes: Sequence[str]):
    """The block of the most-confused classes (at most CONFUSED_BLOCK_CLASSES) as a Figure;
    with no confused image, the classes with the most images. Only that block is made dense."""
    n = len(classes)
    totals = counts.row_totals()
    block = counts.confused_block(CONFUSED_BLOCK_CLASSES)
    if block:
        what = f"the most-confused block: {len(block)} of {n} classes"
    else:
        busiest = np.argsort(-totals, kind="stable")[:CONFUSED_BLOCK_CLASSES]
        block = sorted(busiest[totals[busiest] > 0].tolist())
        what = f"no confused images: the {len(block)} of {n} classes with the most images"
    where = np.full(n, -1, dtype=np.int64)
    where[block] = np.arange(len(block))
    true, pred, times = counts.cells()
    inside = (where[true] >= 0) & (where[pred] >= 0)
    matrix = np.zeros((len(block), len(block)), dtype=np.int64)
    matrix[where[true[inside]], where[pred[inside]]] = times[inside]
    return confusion_figure(
        matrix.tolist(),
        [classes[i] for i in block],
        row_totals=totals[block].tolist(),
        title=f"confusion matrix, {what}",
    )


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics only (no matrix, no confusion counts, no pair list)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list | dict | ConfusionCounts)}
