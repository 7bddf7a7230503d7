"""Streaming prediction (issue 25): `predict_stream` yields each batch's top-k as it is
predicted, `lookcloser predict` writes and flushes rows batch by batch, bad images behave as
documented, and memory stays flat in the number of images."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_model

from lookcloser import api, cli
from lookcloser.ensemble import EnsemblePredictor
from lookcloser.errors import BadImagesError, ConfigError
from lookcloser.predictor import Predictor, top_predictions

SIZE = 16
CLASSES = ["a", "b", "c", "d"]


def _images(folder, n, seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m", CLASSES, SIZE)


@pytest.fixture(scope="module")
def predictor(model):
    return Predictor.load(model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("images") / "imgs", 7)


def _rows(predictions):
    return [p.as_dict() for p in predictions]


def test_stream_yields_each_batch_and_equals_predict(model, predictor, folder):
    """Batches come in input order, each cut to its top-k, and together they are exactly
    `predict`'s result and the top-k of the whole N x C probabilities."""
    stream = predictor.predict_stream([folder], top_k=3, batch_size=3)
    assert len(stream) == 7
    batches = list(stream)
    assert [len(b) for b in batches] == [3, 3, 1]
    streamed = [p for b in batches for p in b]
    assert _rows(streamed) == _rows(predictor.predict([folder], top_k=3, batch_size=3))
    files = sorted(str(f) for f in folder.iterdir())
    positions, probs, skipped = predictor.file_probabilities(files)
    dense = top_predictions(files, positions, probs, CLASSES, 3)
    assert [p.path for p in streamed] == files and not skipped
    assert [p.indices for p in streamed] == [p.indices for p in dense]
    np.testing.assert_allclose(
        [p.probs for p in streamed], [p.probs for p in dense], rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ConfigError, match="iterated once"):
        list(stream)
    # checked before the first batch, as predict checks them
    with pytest.raises(ConfigError, match="top_k"):
        predictor.predict_stream([folder], top_k=0)
    assert _rows(p for b in api.predict_stream(model, [folder], top_k=3) for p in b) == _rows(
        api.predict(model, [folder], top_k=3)
    )


def test_ensemble_stream_mixes_each_batch(predictor, folder, tmp_path):
    """An ensemble's stream is the weighted mixture, batch by batch, equal to the dense
    mixture of the members' whole probabilities."""
    other = save_tiny_model(tmp_path / "other", CLASSES, SIZE, seed=1)
    members = [predictor, Predictor.load(other)]
    ensemble = EnsemblePredictor(members, [0.3, 0.7])
    files = sorted(str(f) for f in folder.iterdir())
    streamed = [p for b in ensemble.predict_stream([folder], top_k=2, batch_size=2) for p in b]
    mixture = 0.3 * members[0].file_probabilities(files)[1]
    mixture += 0.7 * members[1].file_probabilities(files)[1]
    values, indices = mixture.topk(2, dim=1)
    assert [p.indices for p in streamed] == indices.tolist()
    np.testing.assert_allclose([p.probs for p in streamed], values.numpy(), rtol=1e-5)
    assert _rows(streamed) == _rows(ensemble.predict([folder], top_k=2, batch_size=2))


def test_bad_images_skip_and_error(predictor, folder, tmp_path):
    """skip: every good image is predicted (a bad one's batch too) and `.skipped` names the
    bad ones in order. error: the batches before the first bad image are yielded, reading
    goes on and the error names every bad file; the ensemble behaves alike."""
    good = sorted(folder.iterdir())
    bad = [_corrupt(tmp_path / "bad1.png"), _corrupt(tmp_path / "bad2.png")]
    paths = [*good[:4], bad[0], *good[4:6], bad[1]]  # batches of 2: the 3rd and 4th hold one
    stream = predictor.predict_stream(paths, top_k=1, batch_size=2, on_bad_image="skip")
    batches = list(stream)
    assert [len(b) for b in batches] == [2, 2, 1, 1]
    assert [p.path for b in batches for p in b] == [str(p) for p in good[:6]]
    assert [p for p, _ in stream.skipped] == [str(b) for b in bad]

    stream = predictor.predict_stream(paths, top_k=1, batch_size=2)
    seen = []
    with pytest.raises(BadImagesError) as err:
        for batch in stream:
            seen.append([p.path for p in batch])
    assert seen == [[str(good[0]), str(good[1])], [str(good[2]), str(good[3])]]
    assert [p for p, _ in err.value.bad] == [str(b) for b in bad]
    assert "2 unreadable image(s) of 8" in str(err.value)
    with pytest.raises(BadImagesError):
        predictor.predict(paths, batch_size=2)  # predict raises as before, naming both

    ensemble = EnsemblePredictor([predictor, predictor], [0.5, 0.5])
    kept = ensemble.predict(paths, top_k=1, batch_size=2, on_bad_image="skip")
    assert [p.path for p in kept] == [str(p) for p in good[:6]]
    assert [p for p, _ in kept.skipped] == [str(b) for b in bad]
    with pytest.raises(BadImagesError) as err:
        ensemble.predict(paths, batch_size=2)
    assert [p for p, _ in err.value.bad] == [str(b) for b in bad]


class _Stdout(io.StringIO):
    """stdout that remembers what had been flushed."""

    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


def _spy_batches(monkeypatch, at_second):
    """Call `at_second()` when predict asks for its second batch of probabilities."""
    original = Predictor.file_probability_batches

    def spying(self, *args, **kwargs):
        batches = original(self, *args, **kwargs)

        def watched():
            for i, batch in enumerate(batches):
                if i == 1:
                    at_second()
                yield batch

        return watched()

    monkeypatch.setattr(Predictor, "file_probability_batches", spying)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_cli_writes_and_flushes_rows_as_batches_come(model, predictor, folder, monkeypatch, fmt):
    """When the second batch is predicted, the first batch's rows are already written and
    flushed; the whole output is what `predict` gives, in the format's usual text."""
    out = _Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    early = []
    _spy_batches(monkeypatch, lambda: early.append(out.flushed))
    args = ["predict", str(model), str(folder), "--top-k", "2", "--batch-size", "3"]
    assert cli.main([*args, "--format", fmt]) == 0
    expected = _rows(predictor.predict([folder], top_k=2))
    text = out.getvalue()
    first = [r["path"] for r in expected[:3]]
    if fmt == "csv":
        lines = text.splitlines()
        assert lines[0] == "path,rank,class,prob"
        ranked = [(r["path"], rank, t) for r in expected for rank, t in enumerate(r["top"], 1)]
        assert [line.split(",")[:3] for line in lines[1:]] == [
            [path, str(rank), t["class"]] for path, rank, t in ranked
        ]
        probs = [float(line.split(",")[3]) for line in lines[1:]]
        assert probs == pytest.approx([t["prob"] for _, _, t in ranked], abs=1e-6)
        assert [line.split(",")[0] for line in early[0].splitlines()[1:]] == [
            p for p in first for _ in range(2)
        ]
    elif fmt == "jsonl":
        assert [json.loads(line) for line in text.splitlines()] == expected
        assert [json.loads(line)["path"] for line in early[0].splitlines()] == first
    else:
        assert text == json.dumps(expected, indent=2) + "\n"  # the same text as before
        assert json.loads(early[0] + "\n]")[-1]["path"] == first[-1]
        assert len(json.loads(early[0] + "\n]")) == 3


def test_cli_error_keeps_written_rows_and_fails_naming_every_bad_file(
    model, folder, tmp_path, monkeypatch, capsys
):
    """Under --on-bad-image error the rows of the batches before the first bad image stay
    written (a JSON array is closed, so it parses) and the command exits 2 naming them all;
    skip lists them on stderr."""
    good = sorted(folder.iterdir())
    bad = [_corrupt(tmp_path / "x1.png"), _corrupt(tmp_path / "x2.png")]
    paths = [str(p) for p in [*good[:2], bad[0], *good[2:4], bad[1]]]
    base = ["predict", str(model), *paths, "--top-k", "1", "--batch-size", "2"]
    assert cli.main([*base, "--format", "json"]) == 2
    out, err = capsys.readouterr()
    assert [r["path"] for r in json.loads(out)] == paths[:2]
    (line,) = err.strip().splitlines()
    assert line.startswith("lookcloser: error: 2 unreadable image(s) of 6")
    assert all(str(b) in line for b in bad)
    assert cli.main([*base, "--format", "csv"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,rank,class,prob"
    assert [line.split(",")[0] for line in lines[1:]] == paths[:2]
    assert cli.main([*base, "--format", "jsonl", "--on-bad-image", "skip"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(r)["path"] for r in out.splitlines()] == [paths[i] for i in (0, 1, 3, 4)]
    assert [line.split(": ")[1] for line in err.splitlines()] == [str(b) for b in bad]
    # a bad image in the first batch: nothing on stdout, as before
    assert cli.main(["predict", str(model), str(bad[0]), str(good[0]), "--format", "csv"]) == 2
    assert capsys.readouterr().out == ""


def test_neighbours_are_annotated_batch_by_batch(model, folder, tmp_path, capsys):
    """--neighbours / --reject-unknown answers, computed per batch, equal the whole-list
    annotation of the same predictions."""
    from lookcloser.lookalikes.answers import annotate_predictions, open_lookalikes
    from lookcloser.lookalikes.gallery import build_gallery

    model = shutil.copytree(model, tmp_path / "m")
    data = tmp_path / "data"
    for i, name in enumerate(CLASSES):
        _images(data / "train" / name, 4, seed=10 + i)
    predictor = Predictor.load(model)
    build_gallery(predictor, data, model / "gallery")
    expected = predictor.predict([folder], top_k=2)
    extras = annotate_predictions(predictor, expected, open_lookalikes(predictor, model), 2, True)
    args = ["predict", str(model), str(folder), "--top-k", "2", "--batch-size", "3"]
    assert cli.main([*args, "--neighbours", "2", "--reject-unknown", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 7 and all(len(g["neighbours"]) == 2 for r in rows for g in r["neighbours"])
    for row, p, extra in zip(rows, expected, extras, strict=True):
        assert row["path"] == p.path and row["neighbours"] == extra["neighbours"]
        assert row["unknown"] == extra["unknown"]
        assert row["answer"] == ("unknown" if extra["unknown"] else p.classes[0])


# The child measures peak RSS after predicting a few images, then after many: the growth is
# what predicting more images costs. Many classes and few images keep it fast while the old
# whole-run probabilities (400 x 60,000 float32 = 96 MB, kept, then concatenated) grew the
# peak by 95 MB (measured with the previous predictor.py); streaming adds nothing measurable.
CHILD = textwrap.dedent(
    """
    import os, resource, sys
    from lookcloser import cli
    model, few, many = sys.argv[1:4]
    sys.stdout = open(os.devnull, "w")
    peaks = []
    for folder in (few, many):
        assert cli.main(["predict", model, folder, "--format", "csv", "--top-k", "5"]) == 0
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    print((peaks[1] - peaks[0]) / 1024, file=sys.stderr)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_cli_memory_is_flat_in_the_number_of_images(tmp_path):
    """Predicting 400 images instead of 40 with a 60,000-class model adds under 30 MB of peak
    RSS (the whole-run probabilities kept before streaming added 95 MB)."""
    big = save_tiny_model(tmp_path / "big", [f"k{i}" for i in range(60_000)], SIZE)
    few = _images(tmp_path / "few", 40, size=8)
    many = _images(tmp_path / "many", 400, size=8)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(big), str(few), str(many)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mb = float(result.stderr.strip().splitlines()[-1])
    assert growth_mb < 30, f"peak RSS grew by {growth_mb:.1f} MB from 40 to 400 images"
