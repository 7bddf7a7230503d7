"""Metrics of a classifier on a labelled split: top-1/5, mean per-class accuracy, ECE, confusion."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

# The top-1 probability at and above which predictions are this often right, recorded with the
# metrics of each split; `lookcloser serve` flags answers below the val split's as unsure.
CONFIDENCE_ACCURACY = 0.9
CONFIDENCE_KEY = "confidence_for_90pct_accuracy"


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


def compute_metrics(
    logits: Tensor, labels: Tensor, classes: list[str], top_pairs: int = 10
) -> dict[str, Any]:
    """Top-1, top-5, mean per-class accuracy, ECE (15 bins), the confidence threshold for 90 %
    accuracy (`confidence_threshold`) and the most-confused class pairs."""
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
    return {
        "images": int(labels.numel()),
        "classes": n,
        "top1": float(top1),
        f"top{k}": float(top5),
        "mean_per_class_accuracy": float(mean_per_class),
        "ece": float(ece),
        CONFIDENCE_KEY: confidence_threshold(probs, labels, CONFIDENCE_ACCURACY),
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


def write_confusion(
    confusion: list[list[int]], classes: list[str], out_dir: str | Path
) -> tuple[Path, Path]:
    """confusion.csv (rows: true class, columns: predicted) and confusion.png."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "confusion.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion, strict=True):
            writer.writerow([name, *row])
    png_path = out_dir / "confusion.png"
    # A bare Figure (not pyplot): no display backend needed, nothing left open.
    from matplotlib.figure import Figure

    n = len(classes)
    size = min(4 + 0.35 * n, 40)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    matrix = torch.tensor(confusion, dtype=torch.float32)
    normalized = matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    image = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
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
    bar.set_label("share of the true class's images (each row sums to 1)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    fig.clear()
    return csv_path, png_path


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics only (no matrix, no pair list)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
