"""The semi-supervised filter scores batch by batch, keeping per image only scalars: the same
prototypes, scores, thresholds, records and rows as the computation that held every image's
logits and embeddings (a copy of which is kept here as the reference)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lookcloser.config import Config
from lookcloser.data.batch import collate
from lookcloser.data.loading import ImageDataset
from lookcloser.data.prepare import UNLABELLED
from lookcloser.data.samples import Sample
from lookcloser.data.synthetic import generate, generate_unlabelled
from lookcloser.data.transforms import eval_transform
from lookcloser.methods import build_method
from lookcloser.models.modes import eval_mode
from lookcloser.semi.online import logits_and_embeddings
from lookcloser.semi.records import ground_truth, read_rows, read_stages, truth_columns, write_stage
from lookcloser.semi.report import stage_rows
from lookcloser.semi.scores import (
    SCORES,
    BatchScorer,
    PrototypeSums,
    class_prototypes,
    filter_quality,
    ood_scores,
    val_threshold,
)
from lookcloser.semi.scoring import embed, filter_stage


# ---- the reference: every image's logits and embeddings held, as before ---------------------
def _old_class_prototypes(embeddings, labels, num_classes):
    sums = torch.zeros(num_classes, embeddings.shape[1])
    sums.index_add_(0, labels.long().cpu(), F.normalize(embeddings.float().cpu(), dim=1))
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).clamp_min(1)
    return sums / counts[:, None]


@torch.no_grad()
def _old_run_model(method, samples, transform, batch_size, logits=True):
    loader = DataLoader(
        ImageDataset(samples, transform, 89_478_485), batch_size=batch_size, collate_fn=collate
    )
    all_logits, embeddings, labels = [], [], []
    with eval_mode(method):
        for batch in loader:
            if logits:
                out, emb = logits_and_embeddings(method, batch.images)
                all_logits.append(out.float().cpu())
            else:
                emb = method.backbone(batch.images)
            embeddings.append(emb.float().cpu())
            labels.append(batch.targets)
    return torch.cat(all_logits) if all_logits else None, torch.cat(embeddings), torch.cat(labels)


def _old_reason(confident, in_class, ood_score):
    if confident and in_class:
        return "kept"
    if not confident and not in_class:
        return f"low confidence and low {ood_score} score"
    return "low confidence" if not confident else f"low {ood_score} score"


def _old_filter_stage(name, method, cfg, train, val, unlabelled, classes, transform):
    semi, size = cfg.semi, cfg.data.batch_size
    _, train_emb, train_labels = _old_run_model(method, train, transform, size)
    prototypes = _old_class_prototypes(train_emb, train_labels, len(classes))

    def all_scores(logits, emb):
        return {k: ood_scores(k, logits, emb, prototypes) for k in SCORES}

    val_logits, val_emb, _ = _old_run_model(method, val, transform, size)
    thresholds = {
        k: val_threshold(s, semi.val_keep) for k, s in all_scores(val_logits, val_emb).items()
    }
    logits, emb, _ = _old_run_model(method, unlabelled, transform, size)
    scores = all_scores(logits, emb)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    confident = confidence >= semi.threshold
    if semi.ood_score == "none":
        in_class = torch.ones_like(confident)
    else:
        in_class = scores[semi.ood_score] >= thresholds[semi.ood_score]
    kept = confident & in_class
    reasons = [
        _old_reason(bool(c), bool(i), semi.ood_score)
        for c, i in zip(confident, in_class, strict=True)
    ]
    truth = ground_truth(cfg.data.unlabelled)
    rows = [
        {
            "path": s.path,
            "predicted": classes[int(predicted[i])],
            "confidence": f"{float(confidence[i]):.5f}",
            **{kind: f"{float(scores[kind][i]):.5f}" for kind in SCORES},
            "kept": str(bool(kept[i])),
            "reason": reasons[i],
            **truth_columns(s.path, truth),
        }
        for i, s in enumerate(unlabelled)
    ]
    record = {
        "name": name,
        "kind": "filter",
        "total": len(unlabelled),
        "kept": int(kept.sum()),
        "reasons": dict(Counter(reasons)),
        "ood_score": semi.ood_score,
        "val_keep": semi.val_keep,
        "confidence_threshold": semi.threshold,
        "thresholds": thresholds,
        "val_images": len(val),
        "kept_per_class": dict(Counter(r["predicted"] for r in rows if r["kept"] == "True")),
    }
    if truth and all(r["in_class"] for r in rows):
        actual = torch.tensor([r["in_class"] == "True" for r in rows])
        record["quality"] = {
            "filter": filter_quality(kept, actual).as_dict(),
            "confidence only": filter_quality(confident, actual).as_dict(),
            **{
                f"{kind} only": filter_quality(scores[kind] >= thresholds[kind], actual).as_dict()
                for kind in SCORES
            },
        }
        correct = [
            r["predicted"] == r["true_class"]
            for r in rows
            if r["kept"] == "True" and r["in_class"] == "True"
        ]
        record["pseudo_label_accuracy"] = round(sum(correct) / len(correct), 4) if correct else None
    return record, rows, kept


# ---- per batch on random tensors --------------------------------------------------------------
def test_batch_scores_equal_the_scores_of_all_images_at_once():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(37, 11, generator=g)
    embeddings = torch.randn(37, 8, generator=g)
    prototypes = torch.randn(11, 8, generator=g)
    prototypes[3] = 0  # a class never seen: -1 similarity
    embeddings[5] = prototypes[4]  # exactly on a prototype
    scorer = BatchScorer(prototypes)
    parts = [scorer(logits[i : i + 5], embeddings[i : i + 5]) for i in range(0, 37, 5)]
    for kind in SCORES:
        streamed = torch.cat([scores[kind] for scores, _ in parts])
        assert torch.equal(streamed, ood_scores(kind, logits, embeddings, prototypes)), kind
    predicted = torch.cat([p for _, p in parts])
    assert torch.equal(predicted, logits.softmax(dim=1).argmax(dim=1))
    assert torch.cat([s["prototype"] for s, _ in parts])[5] == pytest.approx(1.0)


def test_prototype_sums_in_batches_equal_the_prototypes_of_all_embeddings():
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(53, 16, generator=g)
    labels = torch.randint(0, 6, (53,), generator=g)  # class 6 has no image
    sums = PrototypeSums(7)
    for i in range(0, 53, 4):
        sums.add(embeddings[i : i + 4], labels[i : i + 4])
    expected = _old_class_prototypes(embeddings, labels, 7)
    assert torch.equal(sums.prototypes(16), expected)
    assert torch.equal(class_prototypes(embeddings, labels, 7), expected)
    assert (expected[6] == 0).all()
    assert PrototypeSums(3).prototypes(5).shape == (3, 5)  # no labelled image: zeros


# ---- the whole filter stage on a tiny model and tiny images -----------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    root = generate(folder / "set", classes=3, per_class=3, test_per_class=2, size=32, seed=4)
    unlabelled_dir = generate_unlabelled(
        folder / "unlabelled", classes=3, count=10, in_class=0.4, size=32, seed=5
    )
    classes = sorted(p.name for p in (root / "train").iterdir())

    def samples(split: str) -> list[Sample]:
        return [
            Sample(str(p), i)
            for i, c in enumerate(classes)
            for p in sorted((root / split / c).glob("*.png"))
        ]

    unlabelled = [Sample(str(p), UNLABELLED) for p in sorted(Path(unlabelled_dir).glob("*.png"))]
    cfg = Config.load(
        None, ["model.backbone=resnet18", "model.pretrained=false", "data.image_size=32"]
    )
    torch.manual_seed(0)
    method = build_method(cfg, len(classes))
    return {
        "method": method,
        "train": samples("train"),
        "val": samples("test"),
        "unlabelled": unlabelled,
        "unlabelled_dir": unlabelled_dir,
        "classes": classes,
        "transform": eval_transform(32, 1.0),
    }


@pytest.mark.parametrize(
    "settings",
    [
        ["semi.ood_score=prototype", "semi.threshold=0.34", "semi.val_keep=0.5"],
        ["semi.ood_score=energy", "semi.threshold=0.0", "semi.val_keep=0.8"],
        ["semi.ood_score=none", "semi.threshold=0.34"],
    ],
)
def test_filter_stage_records_what_the_all_logits_computation_recorded(
    tiny_setup, settings, tmp_path
):
    s = tiny_setup
    cfg = Config.load(
        None,
        [f"data.unlabelled={s['unlabelled_dir']}", "data.batch_size=4", "data.num_workers=0"]
        + settings,
    )
    args = (s["method"], cfg, s["train"], s["val"], s["unlabelled"], s["classes"], s["transform"])
    record, rows, kept = filter_stage("round1", *args, progress=False)
    old_record, old_rows, old_kept = _old_filter_stage("round1", *args)
    assert record == old_record
    assert list(record) == list(old_record)  # same keys in the same order in stages.json
    assert list(rows) == old_rows
    assert [rows[i] for i in (0, -1)] == [old_rows[0], old_rows[-1]]
    assert torch.equal(kept, old_kept)
    assert "quality" in record  # the unlabelled folder records its truth
    # The records on disk: the same CSV rows and stage record as from the list of rows.
    write_stage(tmp_path / "new", record, rows)
    write_stage(tmp_path / "old", old_record, old_rows)
    assert read_stages(tmp_path / "new") == read_stages(tmp_path / "old")
    assert (tmp_path / "new/semi/round1.csv").read_bytes() == (
        tmp_path / "old/semi/round1.csv"
    ).read_bytes()
    stage = read_stages(tmp_path / "new")[0]
    assert len(read_rows(tmp_path / "new", stage)) == len(s["unlabelled"])


def test_embeddings_for_clustering_equal_the_old_pass(tiny_setup):
    s = tiny_setup
    new = embed(s["method"], s["unlabelled"], s["transform"], 4, progress=False)
    _, old, _ = _old_run_model(s["method"], s["unlabelled"], s["transform"], 4, logits=False)
    assert torch.equal(new, old)
    assert new.shape == (len(s["unlabelled"]), s["method"].backbone.num_features)


# ---- the report reads the rows once, keeping only what it draws -------------------------------
def _old_picture_rows(record, rows, groups):
    """The histogram values and thumbnail lines as drawn from all rows held in a list."""
    if record["kind"] == "filter":
        score = record["ood_score"]
        values = np.array([float(r[score]) for r in rows])
        group_of = [r["predicted"] for r in rows]
        order = sorted(set(group_of))
        labels = {g: f"predicted {g}" for g in order}
    else:
        values = np.array([float(r["distance"]) for r in rows])
        group_of = [r["cluster"] for r in rows]
        info = {str(c["id"]): c for c in record["clusters"]}
        order = sorted(info, key=lambda c: -info[c]["size"])
        labels = {
            c: f"cluster {c}: {info[c]['size']} images, compactness {info[c]['compactness']:.3f}"
            + ("" if info[c]["kept"] else " (dropped)")
            for c in order
        }
    by_group = defaultdict(lambda: {True: [], False: []})
    for row, group in zip(rows, group_of, strict=True):
        by_group[group][row["kept"] == "True"].append(row)
    lines = []
    for g in order[:groups]:
        if record["kind"] == "filter":
            lines += [
                (f"{labels[g]} - {'kept' if kept else 'dropped'}", by_group[g][kept])
                for kept in (True, False)
                if by_group[g][kept]
            ]
        else:
            lines.append((labels[g], by_group[g][True] + by_group[g][False]))
    truth = [r.get("in_class", "") for r in rows]
    if truth and all(truth):
        split = np.array([t == "True" for t in truth])
    else:
        split = np.array([r["kept"] == "True" for r in rows])
    return values, split, lines


@pytest.mark.parametrize("kind", ["filter", "cluster"])
@pytest.mark.parametrize("truth", [True, False])
def test_report_draws_the_rows_the_all_rows_report_drew(kind, truth):
    rng = np.random.default_rng(3)
    rows = [
        {
            "path": f"/images/{i}.png",
            "predicted": f"class{int(rng.integers(0, 40)):02d}",
            "cluster": str(int(rng.integers(0, 7))),
            "prototype": f"{rng.random():.5f}",
            "distance": f"{rng.random():.5f}",
            "kept": str(bool(rng.random() < 0.3)),
            "in_class": str(bool(rng.random() < 0.5)) if truth else "",
        }
        for i in range(300)
    ]
    sizes = Counter(r["cluster"] for r in rows)
    record = {
        "name": "s",
        "kind": kind,
        "ood_score": "prototype",
        "thresholds": {"prototype": 0.5},
        "k": 7,
        "clusters": [
            {"id": i, "size": sizes[str(i)], "compactness": 0.1 * i, "kept": i % 2 == 0}
            for i in range(7)
        ],
    }
    per_row, groups = 3, 5
    stage = stage_rows(record, iter(rows), per_row, groups)  # one pass over an iterator
    values, split, lines = _old_picture_rows(record, rows, groups)
    assert np.array_equal(stage.values, values)
    assert np.array_equal(stage.in_class if truth else stage.kept, split)
    assert (stage.in_class is not None) == truth
    assert [(label, r[:per_row]) for label, r in stage.lines] == [
        (label, r[:per_row]) for label, r in lines
    ]
    # What is held for the thumbnails is bounded by what is drawn, not by the rows.
    assert sum(len(r) for _, r in stage.lines) <= 2 * per_row * groups
