"""Streaming metrics against the whole-split torchmetrics computation they replace, and the
sparse confusion counts, files and figure past the sizes where a dense matrix is useful."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from lookcloser.errors import DataError
from lookcloser.evaluation import (
    CONFIDENCE_ACCURACY,
    CONFIDENCE_KEY,
    CONFIDENCE_NOTE_KEY,
    DENSE_CONFUSION_CLASSES,
    READABLE_CONFUSION_CLASSES,
    ConfusionCounts,
    StreamingMetrics,
    compute_metrics,
    confidence_threshold,
    most_confused,
    summary,
    threshold_note,
    write_confusion,
)


# --- The reference: compute_metrics and most_confused as they were before streaming (a copy,
# so that the comparison holds whatever the module becomes). ---
def reference_most_confused(confusion, classes, limit=10):
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


def reference_metrics(logits, labels, classes, top_pairs=10, split=None):
    n = len(classes)
    probs = logits.float().softmax(dim=1)
    k = min(5, n)
    top1 = MulticlassAccuracy(num_classes=n, average="micro")(probs, labels)
    top5 = MulticlassAccuracy(num_classes=n, average="micro", top_k=k)(probs, labels)
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
        "most_confused": reference_most_confused(confusion, classes, top_pairs),
        "confusion": confusion.tolist(),
    }


def _case(seed: int, n: int, images: int, absent: int, coarse: bool):
    """Random logits with a right answer more often than chance; `absent` classes never a
    label; `coarse` rounds logits to integers so that ties (in the top-1, the top-k, the
    confidences and the pair counts) are common, and saturates some."""
    g = torch.Generator().manual_seed(seed)
    present = torch.randperm(n, generator=g)[: n - absent]
    labels = present[torch.randint(len(present), (images,), generator=g)]
    logits = torch.randn(images, n, generator=g) * 2
    logits[torch.arange(images), labels] += torch.rand(images, generator=g) * 4
    if coarse:
        logits = logits.round()
        # A quarter scaled up: top-1 probabilities of exactly 1.0 (the last calibration bin,
        # right and wrong), beside ones just under it.
        logits[: images // 4] *= 30
    return logits, labels


def _stream(logits, labels, classes, cuts, top_pairs=10, split=None):
    metrics = StreamingMetrics(classes, top_pairs)
    for a, b in zip([0, *cuts], [*cuts, len(labels)], strict=True):
        metrics.update(logits[a:b], labels[a:b])
    return metrics.compute(split)


CASES = [
    # (seed, classes, images, absent classes, integer logits, log-probabilities)
    (0, 2, 40, 0, False, False),
    (1, 3, 7, 1, True, False),
    (2, 7, 95, 2, True, False),
    (3, 12, 300, 4, False, True),
    (4, 40, 257, 15, True, False),
    (5, 5, 64, 0, True, True),
]


@pytest.mark.parametrize(("seed", "n", "images", "absent", "coarse", "logprobs"), CASES)
def test_streaming_gives_the_figures_of_the_whole_split_computation(
    seed, n, images, absent, coarse, logprobs
):
    """Batch by batch, split anywhere (single images, uneven batches, one batch), every figure
    is the one the whole-split torchmetrics computation gave: counts and accuracies exactly,
    ECE to float32 rounding, the pairs in the same order (ties included)."""
    logits, labels = _case(seed, n, images, absent, coarse)
    if logprobs:
        logits = logits.log_softmax(dim=1)
    classes = [f"c{i}" for i in range(n)]
    expected = reference_metrics(logits, labels, classes, top_pairs=6, split="val")
    rng = np.random.default_rng(seed)
    splits = [
        [],
        sorted(rng.choice(np.arange(1, images), size=min(5, images - 1), replace=False).tolist()),
        list(range(1, images)),
    ]
    for cuts in splits:
        got = _stream(logits, labels, classes, cuts, top_pairs=6, split="val")
        assert isinstance(got.pop("confusion_counts"), ConfusionCounts)
        assert got.pop("ece") == pytest.approx(expected["ece"], abs=1e-6)
        assert got == {k: v for k, v in expected.items() if k != "ece"}
        assert list(got) == [k for k in expected if k != "ece"]
    assert compute_metrics(logits, labels, classes, 6, "val")["top1"] == expected["top1"]


def test_ties_keep_the_row_major_order_of_the_pairs():
    """Equal counts come in row-major order of (true, predicted), as the stable descending sort
    of the flattened matrix gave them; the limit cuts inside a run of ties the same way."""
    g = torch.Generator().manual_seed(7)
    for n in (3, 6, 11):
        dense = torch.randint(0, 3, (n, n), generator=g)
        classes = [str(i) for i in range(n)]
        for limit in (0, 1, 4, n * n):
            expected = reference_most_confused(dense, classes, limit)
            assert most_confused(dense, classes, limit) == expected
            assert most_confused(dense.tolist(), classes, limit) == expected
            assert ConfusionCounts.from_dense(dense).most_confused(classes, limit) == expected


def test_confusion_counts_merge_batches_into_sparse_cells():
    """Counts from many small updates equal one dense count; cells() is row-major nonzero
    cells only, dense() the square table, and the table holds only pairs that occurred."""
    rng = np.random.default_rng(0)
    n = 9
    true, pred = rng.integers(0, n, 500), rng.integers(0, n, 500)
    counts = ConfusionCounts(n)
    for a in range(0, 500, 37):
        counts.update(torch.from_numpy(true[a : a + 37]), pred[a : a + 37])
    expected = np.zeros((n, n), dtype=np.int64)
    np.add.at(expected, (true, pred), 1)
    assert counts.dense() == expected.tolist()
    t, p, c = counts.cells()
    rows, cols = np.nonzero(expected)
    assert t.tolist() == rows.tolist() and p.tolist() == cols.tolist()
    assert c.tolist() == expected[rows, cols].tolist()
    assert counts.images == 500 and len(counts) == len(rows)
    assert counts.row_totals().tolist() == expected.sum(axis=1).tolist()
    # 300,000 classes (a dense table would be 9 x 10**10 cells): four distinct pairs, four cells.
    huge = ConfusionCounts(300_000)
    huge.update([5, 5, 299_999, 7], [5, 6, 0, 6])
    huge.update([299_999], [0])
    assert len(huge) == 4 and huge.images == 5
    assert huge.most_confused([str(i) for i in range(300_000)], 2) == [
        {"true": "299999", "predicted": "0", "count": 2},
        {"true": "5", "predicted": "6", "count": 1},
    ]
    with pytest.raises(ValueError, match="300000 classes"):
        huge.dense()
    with pytest.raises(DataError, match="class index 9 is outside the 9 classes"):
        counts.update([9], [0])


def test_metrics_at_many_classes_keep_no_dense_matrix():
    """At 20,000 classes (a dense int64 matrix would be 3.2 GB) the metrics stream in batches
    and carry only the sparse counts; the per-class hits and totals are there for tables."""
    n, images = 20_000, 600
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, n, (images,), generator=g)
    classes = [f"species {i}" for i in range(n)]
    metrics = StreamingMetrics(classes)
    right = 0
    for a in range(0, images, 256):
        logits = torch.randn(len(labels[a : a + 256]), n, generator=g)
        guess = labels[a : a + 256].clone()
        guess[::3] = (guess[::3] + 1) % n  # one in three confused with the next class
        logits[torch.arange(len(guess)), guess] += 20
        right += int((guess == labels[a : a + 256]).sum())
        metrics.update(logits, labels[a : a + 256])
    result = metrics.compute("test")
    assert "confusion" not in result and n > DENSE_CONFUSION_CLASSES
    assert result["top1"] == pytest.approx(right / images)
    assert len(result["confusion_counts"]) <= images
    assert metrics.per_class_totals.sum() == images and metrics.per_class_hits.sum() == right
    assert all(pair["count"] >= 1 for pair in result["most_confused"])
    assert set(summary(result)) == {
        "images", "classes", "top1", "top5", "mean_per_class_accuracy", "ece", CONFIDENCE_KEY
    }  # fmt: skip


def test_bad_inputs_say_what_is_wrong():
    """Outputs of the wrong width, a label outside the classes, or no image at all: one line."""
    metrics = StreamingMetrics(["a", "b", "c"])
    with pytest.raises(DataError, match=r"shape \(2, 4\) for 3 classes"):
        metrics.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="label 3 is outside the 3 classes"):
        metrics.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(DataError, match="the val split: no images"):
        metrics.compute("val")


def test_long_confusion_csv_above_the_dense_size(tmp_path):
    """Past DENSE_CONFUSION_CLASSES classes confusion.csv lists the nonzero cells by class name
    (row-major); at or under it, a ConfusionCounts writes the same square table as the lists."""
    n = DENSE_CONFUSION_CLASSES + 1
    classes = [f"k{i}" for i in range(n)]
    counts = ConfusionCounts(n)
    counts.update([3, 200, 3, 0, 3], [3, 1, 150, 0, 150])
    csv_path, _ = write_confusion(counts, classes, tmp_path)
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["true", "predicted", "count"],
        ["k0", "k0", "1"],
        ["k3", "k3", "1"],
        ["k3", "k150", "2"],
        ["k200", "k1", "1"],
    ]
    small = ConfusionCounts(3)
    small.update([0, 0, 2, 1], [0, 1, 2, 1])
    (tmp_path / "s").mkdir()
    (tmp_path / "d").mkdir()
    write_confusion(small, ["a", "b", "c"], tmp_path / "s")
    write_confusion(small.dense(), ["a", "b", "c"], tmp_path / "d")
    text = (tmp_path / "s" / "confusion.csv").read_text()
    assert text == (tmp_path / "d" / "confusion.csv").read_text()
    assert text.splitlines()[1] == "a,1,1,0"


def _spy_figures(monkeypatch, draw: bool = True):
    """Figures write_confusion saves, as what they show; `draw=False` skips the drawing (a
    60-class figure takes seconds) and writes an empty file."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        matrix = fig.axes[0]
        saved.append(
            {
                "title": matrix.get_title(),
                "bar_label": fig.axes[-1].get_ylabel(),
                "shares": np.asarray(matrix.images[0].get_array()),
                "labels": [t.get_text() for t in matrix.get_yticklabels()],
                "cells": sorted(t.get_text() for t in matrix.texts),
            }
        )
        if draw:
            return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_confusion_png_of_many_classes_is_the_most_confused_block(tmp_path, monkeypatch):
    """Past READABLE_CONFUSION_CLASSES classes the figure is the block of the classes in the
    most-confused pairs (at most 30), titled as such, coloured by the share of all the true
    class's images; the whole matrix is never drawn."""
    saved = _spy_figures(monkeypatch)
    n = 5000
    classes = [f"sp{i}" for i in range(n)]
    counts = ConfusionCounts(n)
    rng = np.random.default_rng(0)
    diagonal = rng.integers(0, n, 3000)
    counts.update(diagonal, diagonal)
    # Three strong confusions among four classes, then one-image noise everywhere.
    counts.update([10] * 6 + [4000] * 5 + [10] * 4, [4000] * 6 + [10] * 5 + [77] * 4)
    noise = rng.integers(0, n, (400, 2))
    counts.update(noise[:, 0], noise[:, 1])
    write_confusion(counts, classes, tmp_path)
    (figure,) = saved
    block = figure["labels"]
    assert 3 <= len(block) <= 30 and {"sp10", "sp77", "sp4000"} <= set(block)
    assert block == sorted(block, key=lambda name: int(name[2:]))  # class order
    assert f"most-confused block: {len(block)} of {n} classes" in figure["title"]
    assert figure["shares"].shape == (len(block), len(block))
    totals = counts.row_totals()
    i, j = block.index("sp10"), block.index("sp4000")
    assert figure["shares"][i, j] == pytest.approx(6 / totals[10])
    assert "need not sum to 1" in figure["bar_label"]
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.format == "PNG"
    # A perfect classifier: the classes with the most images, said so.
    perfect = ConfusionCounts(n)
    perfect.update([1, 1, 2, 3, 3, 3], [1, 1, 2, 3, 3, 3])
    write_confusion(perfect, classes, tmp_path)
    assert "no confused images" in saved[-1]["title"]
    assert saved[-1]["labels"][:3] == ["sp1", "sp2", "sp3"]


def test_confusion_png_whole_up_to_the_readable_size(tmp_path, monkeypatch):
    """At READABLE_CONFUSION_CLASSES classes the figure is the whole matrix, as before, from a
    ConfusionCounts or the dense lists; one more class and it is the block."""
    saved = _spy_figures(monkeypatch, draw=False)
    n = READABLE_CONFUSION_CLASSES
    labels = torch.arange(2 * n) % n
    predicted = labels.clone()
    predicted[:5] = n - 1
    counts = ConfusionCounts(n)
    counts.update(labels, predicted)
    write_confusion(counts, [f"c{i}" for i in range(n)], tmp_path)
    write_confusion(counts.dense(), [f"c{i}" for i in range(n)], tmp_path)
    assert [s["shares"].shape for s in saved] == [(n, n), (n, n)]
    assert saved[0]["title"].startswith("confusion matrix\n")
    assert "each row sums to 1" in saved[0]["bar_label"]
    more = ConfusionCounts.from_dense(np.pad(np.array(counts.dense()), ((0, 1), (0, 1))))
    write_confusion(more.dense(), [f"c{i}" for i in range(n + 1)], tmp_path)
    assert saved[-1]["shares"].shape == (6, 6)  # c0..c4 and c59
    assert "most-confused block: 6 of 61 classes" in saved[-1]["title"]
    assert saved[-1]["cells"] == sorted(["1"] * 5 + ["1"] * 5 + ["2"])


def test_summary_drops_the_confusion_counts():
    """summary() keeps the scalars for model.json: no matrix, no counts object, no pair list."""
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.eye(3)[torch.tensor([0, 2, 2, 1])] * 10
    metrics = compute_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["confusion_counts"].dense() == metrics["confusion"]
    kept = summary(metrics)
    assert "confusion_counts" not in kept and "confusion" not in kept
    assert "most_confused" not in kept and kept["top1"] == 0.5
