"""benchmarks/longtail.py: the fish23 long-tail protocol's parts and its place in the results page."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import longtail
    import results
finally:
    sys.path.pop(0)


def split_of(tracks_per_class: list[int], frames: int = 3, dim: int = 8) -> longtail.Split:
    labels, tracks = [], []
    for c, count in enumerate(tracks_per_class):
        for t in range(count):
            labels += [c] * frames
            tracks += [f"{c}{t:03d}"] * frames
    return longtail.Split(torch.randn(len(labels), dim), torch.tensor(labels), tracks)


def test_the_validation_split_holds_out_whole_tracks():
    train = split_of([8, 4, 1])
    fit, val = longtail.carve_val(train, 3)
    assert not set(fit.tracks) & set(val.tracks), "no fish track on both sides"
    assert len(fit.labels) + len(val.labels) == len(train.labels)
    val_tracks = {
        c: {t for t, y in zip(val.tracks, val.labels.tolist(), strict=True) if y == c}
        for c in (0, 1, 2)
    }
    assert [len(val_tracks[c]) for c in (0, 1, 2)] == [2, 1, 0]  # a quarter, at least one
    assert (fit.labels == 2).sum() == 3, "a class of one track stays in train"
    again, _ = longtail.carve_val(train, 3)
    assert again.tracks == fit.tracks, "the split is the same on every run"


def test_shot_groups_follow_the_training_counts():
    groups = longtail.shot_groups([101, 100, 20, 19, 600])
    assert groups == {"many": [0, 4], "medium": [1, 2], "few": [3]}


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("plain", longtail.Setting(1e-2, 20)),
        ("balanced", longtail.Setting(1e-2, 20)),
        ("twostage", longtail.Setting(1e-2, 15, stage2_lr=1e-3, stage2_epochs=5)),
        ("arcface", longtail.Setting(3e-2, 20)),
        ("prototype", longtail.Setting(1e-1, 20)),
    ],
)
def test_each_variant_learns_a_separable_long_tailed_set(name, setting):
    """Three classes of 40, 10 and 3 points around distinct centres (mirrored copies beside):
    every variant's head, trained by the benchmark's loop, learns them, the 3-point class too."""
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.eye(3, 16)
    labels = torch.tensor([0] * 40 + [1] * 10 + [2] * 3)
    features = centres[labels] + 0.3 * torch.randn(len(labels), 16, generator=gen)
    mirrored = features + 0.1 * torch.randn(features.shape, generator=gen)
    data = longtail.Split(features, labels, [str(i) for i in range(len(labels))], mirrored)
    variant = next(v for v in longtail.VARIANTS if v.name == name)
    head = longtail.train_head(variant, setting, data, 3, seed=0)
    scores = longtail.score(head, data, ["a", "b", "c"], [40, 10, 3])
    assert scores["top1"] >= 0.95 and scores["few"] == 1.0, scores


def longtail_record(entry: str, seed: int, per_class: float, top1: float) -> dict:
    return {
        "kind": "longtail",
        "dataset": "fish23",
        "entry": entry,
        "seed": seed,
        "backbone": "tf_efficientnet_lite0",
        "size": 96,
        "lr": 0.003,
        "epochs": 10,
        "top1": top1,
        "mean_per_class_accuracy": per_class,
        "many": top1,
        "medium": per_class,
        "few": per_class - 0.1,
        "many_classes": 13,
        "medium_classes": 7,
        "few_classes": 3,
        "many_test_images": 1057,
        "medium_test_images": 74,
        "few_test_images": 12,
        "train_images": 4959,
        "test_images": 1143,
        "section": "longtail",
        "command": "python benchmarks/longtail.py --data-root DATA --work WORK --seeds 0 1 2",
    }


def test_long_tail_records_make_the_fish23_table(tmp_path):
    """The fish23 long-tail table is generated from the records: a variant better on every
    seed heads it, with its paired difference from plain."""
    records = tmp_path / "records"
    records.mkdir()
    for source in (ROOT / "benchmarks" / "records").glob("*.jsonl"):
        if source.name != "longtail.jsonl":
            (records / source.name).write_text(source.read_text())
    made_up = [longtail_record("plain", s, 0.6 + s / 100, 0.8) for s in (0, 1, 2)]
    made_up += [longtail_record("made-up-sampler", s, 0.7 + s / 100, 0.79) for s in (0, 1, 2)]
    (records / "longtail.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made_up))
    doc = tmp_path / "benchmarks.md"
    doc.write_text((ROOT / "docs" / "benchmarks.md").read_text())
    page = results.current_block(results.generate(doc.read_text(), results.read_records(records)))
    fish = page.split("### fish23", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in fish.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1, fish
    assert "made-up-sampler" in rows[0] and "**71.0** ± 1.0" in rows[0]
    assert (
        "+10.0 (higher on 3 of 3 seeds)" in rows[0] and "-1.0 (higher on 0 of 3 seeds)" in rows[0]
    )
    assert "13 classes, 1,057 test images" in fish
