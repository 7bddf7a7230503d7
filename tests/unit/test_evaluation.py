"""Metrics on hand-built logits with known answers, confusion pairs and confusion files."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from PIL import Image

from lookcloser import evaluation
from lookcloser.evaluation import (
    CONFIDENCE_KEY,
    CONFIDENCE_NOTE_KEY,
    MIN_CONFIDENCE_IMAGES,
    compute_metrics,
    confidence_threshold,
    label_fonts,
    most_confused,
    short_label,
    summary,
    threshold_note,
    write_confusion,
)


def _logits_for(predicted: list[int], n: int, confidence: float = 20.0) -> torch.Tensor:
    logits = torch.zeros(len(predicted), n)
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = confidence
    return logits


def test_top1_and_mean_per_class_over_present_classes():
    """Top-1 counts images; mean per-class accuracy averages only classes in the split."""
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2])
    predicted = [0, 0, 1, 0, 2, 0, 1]  # class 0: 2/2, class 1: 1/4, class 2: 0/1, class 3 absent
    metrics = compute_metrics(_logits_for(predicted, 4), labels, ["a", "b", "c", "d"])
    assert metrics["images"] == 7 and metrics["classes"] == 4
    assert metrics["top1"] == pytest.approx(3 / 7)
    assert metrics["mean_per_class_accuracy"] == pytest.approx((1.0 + 0.25 + 0.0) / 3)
    assert metrics["confusion"][1] == [2, 1, 1, 0]
    assert metrics["confusion"][3] == [0, 0, 0, 0]


def test_top_k_uses_the_ranking():
    """Top-k counts a label found among the k highest logits (k = min(5, classes))."""
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1, 0],  # label 4 at rank 5 -> in top-5, not top-1
            [0.0, 1, 2, 3, 4, 5, 6],  # label 0 at rank 7 -> missed
            [0.0, 9, 0, 0, 0, 0, 0],  # label 1 at rank 1
        ]
    )
    metrics = compute_metrics(logits, torch.tensor([4, 0, 1]), list("abcdefg"))
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == pytest.approx(2 / 3)
    three = compute_metrics(torch.tensor([[3.0, 2, 1]]), torch.tensor([2]), ["x", "y", "z"])
    assert three["top3"] == 1.0 and three["top1"] == 0.0 and "top5" not in three


def test_ece_known_values():
    """ECE: 0 for a confident correct model; |accuracy - confidence| for a constant one."""
    labels = torch.tensor([0, 1, 2, 1])
    perfect = compute_metrics(_logits_for([0, 1, 2, 1], 3, 50.0), labels, ["a", "b", "c"])
    assert perfect["top1"] == 1.0
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-6)
    # Two classes, always 50/50: confidence 0.5 everywhere.
    flat = torch.zeros(4, 2)
    always_right = compute_metrics(flat, torch.tensor([0, 0, 0, 0]), ["a", "b"])
    assert always_right["ece"] == pytest.approx(0.5, abs=1e-6)
    half_right = compute_metrics(flat, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    assert half_right["ece"] == pytest.approx(0.0, abs=1e-6)
    # Confidently wrong: confidence ~1, accuracy 0.
    wrong = compute_metrics(_logits_for([1, 0], 2, 50.0), torch.tensor([0, 1]), ["a", "b"])
    assert wrong["ece"] == pytest.approx(1.0, abs=1e-6)


def test_most_confused_ordering():
    """Off-diagonal pairs, largest first, zeros and the diagonal left out, up to the limit."""
    confusion = torch.tensor([[5, 1, 3], [0, 9, 2], [4, 0, 1]])
    pairs = most_confused(confusion, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("c", "a", 4),
        ("a", "c", 3),
        ("b", "c", 2),
        ("a", "b", 1),
    ]
    assert len(most_confused(confusion, ["a", "b", "c"], limit=2)) == 2
    assert most_confused(torch.eye(3, dtype=torch.long) * 7, ["a", "b", "c"]) == []


def test_compute_metrics_reports_confused_pairs():
    """compute_metrics lists the most-confused pairs of its confusion matrix."""
    labels = torch.tensor([0, 0, 0, 1, 2])
    metrics = compute_metrics(_logits_for([1, 1, 0, 1, 0], 3), labels, ["x", "y", "z"])
    assert metrics["most_confused"] == [
        {"true": "x", "predicted": "y", "count": 2},
        {"true": "z", "predicted": "x", "count": 1},
    ]
    scalars = summary(metrics)
    assert "confusion" not in scalars and "most_confused" not in scalars
    assert scalars["top1"] == pytest.approx(2 / 5)


def test_write_confusion_csv_and_png(tmp_path):
    """confusion.csv has a header of predicted classes and one row per true class; PNG too."""
    classes = ["owl", "hawk", "wren"]
    confusion = [[3, 1, 0], [0, 2, 0], [1, 0, 4]]
    csv_path, png_path = write_confusion(confusion, classes, tmp_path)
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\predicted", "owl", "hawk", "wren"]
    assert rows[1:] == [["owl", "3", "1", "0"], ["hawk", "0", "2", "0"], ["wren", "1", "0", "4"]]
    with Image.open(png_path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_confusion_png_says_what_numbers_and_colour_show(tmp_path, monkeypatch):
    """Cells print raw counts and the colour is the share of the true class: title and bar say so."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        saved.append(
            {
                "title": fig.axes[0].get_title(),
                "bar_label": fig.axes[-1].get_ylabel(),
                "axes": len(fig.axes),
                "cells": [t.get_text() for t in fig.axes[0].texts],
            }
        )
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    open_before = plt.get_fignums()
    confusion = [[3, 1, 0], [0, 2, 0], [1, 0, 4]]
    write_confusion(confusion, ["owl", "hawk", "wren"], tmp_path)
    (figure,) = saved
    assert "rows normalized" not in figure["title"]
    assert "numbers: image counts" in figure["title"]
    assert "colour: share of the true class" in figure["title"]
    assert figure["axes"] == 2  # the matrix and its colour bar
    assert "share of the true class" in figure["bar_label"]
    assert sorted(figure["cells"]) == ["1", "1", "2", "3", "4"]  # counts, not shares
    assert plt.get_fignums() == open_before


def test_confidence_threshold_keeps_the_most_images_at_the_accuracy():
    """The threshold is the lowest top-1 probability whose predictions at or above it are
    right at least 90 % of the time; 1.0 when none are, and it is in every split's metrics."""
    # Class 0 predicted with top-1 probability 0.9, 0.85, ..., 0.5; wrong at 0.7 and 0.55.
    confidence = torch.tensor([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    probs = torch.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 0, 1, 0])
    # At >= 0.75: 4 of 4 right; >= 0.7: 4 of 5 (0.8); >= 0.6: 6 of 7 (0.857); >= 0.5: 7 of 9.
    assert confidence_threshold(probs, labels, 0.9) == pytest.approx(0.75)
    assert confidence_threshold(probs, labels, 0.8) == pytest.approx(0.6)
    assert confidence_threshold(probs, labels, 0.75) == pytest.approx(0.5)
    assert confidence_threshold(probs, torch.ones(9, dtype=torch.long), 0.9) == 1.0
    assert confidence_threshold(probs[:0], labels[:0]) == 0.0
    # compute_metrics needs MIN_CONFIDENCE_IMAGES: the same answers four times over (36).
    many, many_labels = probs.repeat(4, 1), labels.repeat(4)
    metrics = compute_metrics(many.log(), many_labels, ["a", "b", "c"])
    assert metrics[CONFIDENCE_KEY] == pytest.approx(confidence_threshold(many, many_labels, 0.9))
    assert CONFIDENCE_NOTE_KEY not in metrics


def test_no_confidence_threshold_from_a_split_too_small_to_estimate_it():
    """Under MIN_CONFIDENCE_IMAGES images no threshold is set (None), and the metrics say why,
    naming the split; at the minimum it is set."""
    assert MIN_CONFIDENCE_IMAGES == 30
    torch.manual_seed(0)
    small = compute_metrics(torch.randn(8, 4), torch.arange(8) % 4, list("abcd"), split="val")
    assert small[CONFIDENCE_KEY] is None
    assert small[CONFIDENCE_NOTE_KEY] == (
        "val split of 8 images: too small to set an unsure threshold (needs at least 30 images)"
    )
    assert summary(small)[CONFIDENCE_NOTE_KEY] == small[CONFIDENCE_NOTE_KEY]  # into model.json
    unnamed = compute_metrics(torch.randn(29, 4), torch.arange(29) % 4, list("abcd"))
    assert unnamed[CONFIDENCE_NOTE_KEY].startswith("29 images: too small")
    enough = compute_metrics(torch.randn(30, 4), torch.arange(30) % 4, list("abcd"), split="val")
    assert isinstance(enough[CONFIDENCE_KEY], float) and CONFIDENCE_NOTE_KEY not in enough
    assert threshold_note(30) is None and "3 images" in threshold_note(3, "test")


def test_short_label_cuts_long_names_with_an_ellipsis():
    """Names over MAX_LABEL_COLUMNS columns end in an ellipsis; CJK characters count two."""
    assert short_label("owl") == "owl"
    long = short_label("x" * 60)
    assert long == "x" * 23 + "\u2026" and len(long) == 24
    assert short_label("\u9ce5" * 20) == "\u9ce5" * 11 + "\u2026"  # 22 + 1 columns
    assert short_label("a" * 24) == "a" * 24


def test_confusion_png_long_and_cjk_names(tmp_path, monkeypatch, caplog):
    """A 60-character and a CJK class name: tick labels cut with an ellipsis, no per-glyph
    warning escapes (one log line when no CJK font is installed, none when one is), and the
    title, the colour-bar label and the tick labels stay apart and inside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    boxes = []
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        FigureCanvasAgg(fig)
        fig.draw_without_rendering()  # runs the constrained layout
        renderer = fig.canvas.get_renderer()
        matrix, bar = fig.axes
        boxes.append(
            {
                "figure": fig.bbox,
                "title": matrix.title.get_window_extent(renderer),
                "bar_label": bar.yaxis.label.get_window_extent(renderer),
                "matrix": matrix.get_window_extent(renderer),
                "ticks": [
                    t.get_window_extent(renderer)
                    for t in matrix.get_xticklabels() + matrix.get_yticklabels()
                ],
                "labels": [t.get_text() for t in matrix.get_yticklabels()],
            }
        )
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    monkeypatch.setattr(evaluation, "_said_missing_glyphs", False)
    classes = [("Black-footed Albatross " * 3)[:60], "\u9ce5\u985e", "owl"]
    confusion = [[3, 1, 0], [0, 2, 0], [1, 0, 4]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # said once, not once per figure
            write_confusion(confusion, classes, tmp_path)
    assert not [w for w in caught if "Glyph" in str(w.message) or "font" in str(w.message)]
    said = [r for r in caplog.records if "confusion.png" in r.getMessage()]
    has_cjk = len(label_fonts()) > 1
    assert len(said) == (0 if has_cjk else 1)
    if said:
        assert "\u9ce5" in said[0].getMessage() and "boxes" in said[0].getMessage()
    box = boxes[0]
    assert box["labels"] == [short_label(classes[0]), "\u9ce5\u985e", "owl"]
    assert box["labels"][0].endswith("\u2026")
    assert not box["title"].overlaps(box["bar_label"])
    for tick in box["ticks"]:
        assert not tick.overlaps(box["title"]) and not tick.overlaps(box["bar_label"])
    for part in [box["title"], box["bar_label"], *box["ticks"]]:
        assert box["figure"].contains(part.x0, part.y0) and box["figure"].contains(part.x1, part.y1)
    # The matrix keeps most of the figure's width (a long name no longer squeezes it).
    assert box["matrix"].width > 0.4 * box["figure"].width
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.format == "PNG"
