"""RunRecord: one pass over a stream of model outputs keeps, per image, the label, the top-K
classes and their probabilities and the true class's probability; what compare and ensemble
fit derive from it equals the dense computation, its cache file is checked on load, and it
stays linear in images at iNat's class counts."""

from __future__ import annotations

import logging
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from lookcloser.evaluation import StreamingMetrics, compute_metrics, summary
from lookcloser.predictor import OutputBatch
from lookcloser.records import TOP_K, RunRecord


def random_outputs(seed: int, images: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with some exact ties (equal rows, and rounded values), and their labels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(images, classes, generator=gen) * 3
    logits[: images // 5] = logits[: images // 5].round()  # many equal probabilities
    logits[images // 5 : images // 5 + 2] = 0.0  # every class tied
    labels = torch.randint(0, classes, (images,), generator=gen)
    return logits, labels


def stream_of(logits, labels, batch: int, paths=None):
    paths = paths if paths is not None else [f"c{int(y)}/{i:05d}.png" for i, y in enumerate(labels)]
    for start in range(0, len(labels), batch):
        end = start + batch
        yield OutputBatch(logits[start:end], labels[start:end], paths[start:end])


def dense_order(probs: np.ndarray) -> np.ndarray:
    """Each row's classes, most probable first, equal probabilities lowest class first."""
    return np.lexsort((np.broadcast_to(np.arange(probs.shape[1]), probs.shape), -probs), axis=1)


@pytest.mark.parametrize(
    ("seed", "images", "classes", "batch", "top_k"),
    [(0, 50, 3, 7, TOP_K), (1, 64, 12, 64, TOP_K), (2, 33, 25, 5, TOP_K), (3, 40, 9, 16, 4)],
)
def test_record_from_a_stream_equals_the_dense_computation(seed, images, classes, batch, top_k):
    logits, labels = random_outputs(seed, images, classes)
    seen = StreamingMetrics([f"c{i}" for i in range(classes)])
    record = RunRecord.from_stream(
        stream_of(logits, labels, batch), classes, top_k=top_k, observe=seen.update
    )
    probs = logits.softmax(dim=1).numpy()
    y = labels.numpy()
    k = min(top_k, classes)
    assert record.k == k and record.images == images
    assert record.labels.dtype == np.int32 and record.top_classes.dtype == np.int32
    assert record.top_probs.dtype == np.float32 and record.true_probs.dtype == np.float32
    # Top-1 is argmax (the first of equal values), the top-K the dense ranking.
    np.testing.assert_array_equal(record.predictions, probs.argmax(axis=1))
    order = dense_order(probs)[:, :k]
    np.testing.assert_array_equal(record.top_classes, order)
    np.testing.assert_array_equal(record.top_probs, np.take_along_axis(probs, order, 1))
    # Per class: hits and totals as bincounts over the dense predictions.
    right = probs.argmax(axis=1) == y
    np.testing.assert_array_equal(record.correct, right)
    np.testing.assert_array_equal(record.per_class_totals, np.bincount(y, minlength=classes))
    np.testing.assert_array_equal(record.per_class_hits, np.bincount(y[right], minlength=classes))
    present = np.bincount(y, minlength=classes) > 0
    np.testing.assert_allclose(
        record.per_class_accuracy[present],
        np.bincount(y[right], minlength=classes)[present]
        / np.bincount(y, minlength=classes)[present],
    )
    assert np.isnan(record.per_class_accuracy[~present]).all()
    # Log-loss exact from the stored true-class probabilities.
    dense_loss = -np.log(np.clip(probs[np.arange(images), y].astype(np.float64), 1e-12, None))
    assert record.log_loss() == pytest.approx(dense_loss.mean(), rel=1e-12)
    assert record.paths == [f"c{int(t)}/{i:05d}.png" for i, t in enumerate(y)]
    # The metrics of the same pass are those of the whole arrays at once.
    assert summary(seen.compute()) == summary(compute_metrics(logits, labels, seen.classes))


def test_renumbered_record_is_the_record_of_reordered_classes():
    logits, labels = random_outputs(4, 40, 6)
    perm = np.array([3, 0, 5, 1, 4, 2])  # class i becomes perm[i]
    reordered = torch.empty_like(logits)
    reordered[:, torch.from_numpy(perm)] = logits
    direct = RunRecord.from_logits(reordered, torch.from_numpy(perm)[labels])
    renumbered = RunRecord.from_logits(logits, labels).renumber(perm)
    np.testing.assert_array_equal(renumbered.labels, direct.labels)
    np.testing.assert_array_equal(renumbered.top_classes, direct.top_classes)
    # (softmax sums the reordered columns in another order: equal to the last bit or two)
    np.testing.assert_allclose(renumbered.top_probs, direct.top_probs, rtol=1e-6)
    subset = renumbered.take(np.array([5, 0, 7]))
    np.testing.assert_array_equal(subset.labels, direct.labels[[5, 0, 7]])


def test_bad_outputs_are_refused_with_the_shapes():
    from lookcloser.errors import DataError

    with pytest.raises(DataError, match="outside the 3 classes"):
        RunRecord.from_logits(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(DataError, match="model outputs of shape"):
        RunRecord.from_logits(torch.zeros(2, 3), torch.tensor([0]))


# ---- the cache file ------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    logits, labels = random_outputs(5, 30, 8)
    paths = [f"クラス/{i}.png" if i % 2 else f"a/b/{i}.jpg" for i in range(30)]
    record = RunRecord.from_stream(stream_of(logits, labels, 8, paths), 8)
    record.metrics = {"top1": 0.5, "images": 30, "ece": 0.1, "note": None}
    return record, record.save(tmp_path / "run.npz")


def test_cache_round_trip(saved):
    record, file = saved
    back = RunRecord.load(file, max_images=30)
    for name in ("labels", "top_classes", "top_probs", "true_probs"):
        got, want = getattr(back, name), getattr(record, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert back.paths == record.paths and back.metrics == record.metrics
    assert back.num_classes == 8
    with zipfile.ZipFile(file) as archive:  # plain arrays: nothing a loader would execute
        assert all(name.endswith(".npy") for name in archive.namelist())


def rewrite(file, **changes):
    """The .npz at `file` with some arrays replaced (or added)."""
    with np.load(file, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    arrays.update(changes)
    with open(file, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "tamper",
    [
        "truncated",
        "labels as floats",
        "a class out of range",
        "a probability over 1",
        "paths out of step",
        "a pickled array",
        "more images than the split",
        "another format",
    ],
)
def test_a_tampered_cache_is_ignored_with_a_warning(saved, tamper, caplog):
    record, file = saved
    limit = None
    if tamper == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    elif tamper == "labels as floats":
        rewrite(file, labels=record.labels.astype(np.float32))
    elif tamper == "a class out of range":
        rewrite(file, top_classes=np.full_like(record.top_classes, 8))
    elif tamper == "a probability over 1":
        rewrite(file, true_probs=np.full_like(record.true_probs, 3.0))
    elif tamper == "paths out of step":
        rewrite(file, path_ends=np.arange(30, dtype=np.int64) * 1000)
    elif tamper == "a pickled array":
        with np.load(file, allow_pickle=False) as original:
            arrays = {name: original[name] for name in original.files}
        arrays["metrics"] = np.array([{"top1": 1.0}], dtype=object)
        with open(file, "wb") as f:
            np.savez(f, **arrays)
    elif tamper == "more images than the split":
        limit = 29
    elif tamper == "another format":
        rewrite(file, format=np.array([0], dtype=np.int64))
    with caplog.at_level(logging.WARNING, logger="lookcloser.records"):
        assert RunRecord.load(file, max_images=limit) is None
    assert str(file) in caplog.text and "ignored, rebuilt" in caplog.text


def test_no_cache_file_is_no_record(tmp_path, caplog):
    assert RunRecord.load(tmp_path / "missing.npz") is None
    assert not caplog.text


# ---- scale ---------------------------------------------------------------------------------
def test_record_at_scale_stays_linear_in_images(tmp_path):
    """20,000 images x 5,000 classes streamed in batches: the record holds ~90 bytes an image
    (the logits would be 400 MB), its file under 150 bytes an image, and the per-class table
    of compare comes from counts in well under a second."""
    from lookcloser.compare import Group, Run, _per_class_csv

    images, classes, batch = 20_000, 5_000, 1_000
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (images,), generator=gen)

    def stream():
        for start in range(0, images, batch):
            logits = torch.rand(batch, classes, generator=gen)
            y = labels[start : start + batch]
            logits[torch.arange(len(y))[::2], y[::2]] += 1.0  # half of them right
            yield OutputBatch(logits, y, [f"c{int(t)}/{start + i}.png" for i, t in enumerate(y)])

    tracemalloc.start()
    record = RunRecord.from_stream(stream(), classes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(a.nbytes for a in (record.labels, record.top_classes, record.top_probs))
    held += record.true_probs.nbytes
    assert held == images * (4 + TOP_K * 8 + 4)
    # Python-side peak while streaming (arrays, paths): a fraction of one batch of logits
    # per image, never images x classes (400 MB here).
    assert peak < 300 * images
    file = record.save(tmp_path / "big.npz")
    assert file.stat().st_size < 150 * images
    assert 0.45 < record.correct.mean() < 0.55

    run = Run(tmp_path, {"classes": []}, None, 0, "baseline", "k", {}, outputs=record)
    names = [f"class {i}" for i in range(classes)]
    start = time.perf_counter()
    header, rows = _per_class_csv(
        [Group("baseline", "baseline", [run])], names, record.per_class_totals
    )
    elapsed = time.perf_counter() - start
    assert len(rows) == classes and elapsed < 0.5
    hits, totals = record.per_class_hits, record.per_class_totals
    row = int(np.argmax(totals))
    assert float(rows[row][2]) == pytest.approx(hits[row] / totals[row])
