"""`compare` across data sources: one synthetic folder trained from the folder, from shards
packed from it and from a CSV of its files compares; other classes or other test images are
refused before anything is evaluated, naming what differs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flowkit import SCRATCH

from lookcloser import api
from lookcloser.cli import main
from lookcloser.errors import DataError

# Seconds per run: flowkit's tiny random backbone on 32 px images (plumbing, not learning),
# one epoch without validation.
TINY = [
    *SCRATCH,
    "data.val_fraction=0",
    "trainer.epochs=1",
    "trainer.val_every_n_epochs=0",
    "trainer.cpu_threads=1",
]


def _train(out: Path, *overrides: str) -> Path:
    api.train(overrides=[*TINY, *overrides, f"out={out}"], progress=False)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 3-class folder as a folder, as shards and as a CSV, a run trained on each,
    and a run on a 4-class set."""
    from lookcloser.data.synthetic import generate

    base = tmp_path_factory.mktemp("sources")
    folder = generate(base / "synth", classes=3, per_class=6, test_per_class=4, size=32)
    shards = base / "shards"
    # Shards of 5 samples, so the 12 test images span 3 shards, and two DataLoader workers
    # interleave them: the shard run's outputs come in another order than the folder's.
    assert main(["data", "pack", "imagefolder", str(shards), "--shard-size", "5",
                 f"data.root={folder}", "data.val_fraction=0"]) == 0  # fmt: skip
    listing = base / "lists" / "all.csv"
    listing.parent.mkdir()
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split in ("train", "test"):
            for image in sorted((folder / split).glob("*/*.png")):
                relative = Path("..", "synth", split, image.parent.name, image.name)
                writer.writerow([relative.as_posix(), image.parent.name, split])
    runs = base / "runs"
    return {
        "base": base,
        "folder": folder,
        "runs": {
            "folder": _train(runs / "folder", "data.source=imagefolder", f"data.root={folder}"),
            "shards": _train(
                runs / "shards", "data.source=shards", f"data.root={shards}", "data.num_workers=2"
            ),
            "csv": _train(runs / "csv", "data.source=csv", f"data.root={listing}"),
        },
        "four": _train(
            runs / "four",
            "data.source=synthetic",
            f"data.root={base / 'synth4'}",
            "data.synthetic.classes=4",
            "data.synthetic.per_class=2",
            "data.synthetic.test_per_class=1",
            "data.synthetic.size=32",
        ),
    }


def test_shards_record_each_image_s_relative_path(sources):
    from lookcloser.data.shards import open_shards, shard_records

    index = open_shards(str(sources["base"] / "shards"))
    assert index.root == str(sources["folder"].resolve()) and index.reencoded is False
    records = list(shard_records(index, "test"))
    assert len(records) == 12 and all(r.recorded for r in records)
    assert records[0].name == f"test/{index.classes[0]}/0000.png"


@pytest.mark.parametrize("pair", [("folder", "shards"), ("folder", "csv"), ("shards", "csv")])
def test_runs_on_the_same_images_from_other_sources_compare(sources, pair, tmp_path, capsys):
    runs = [sources["runs"][name] for name in pair]
    out = tmp_path / "report"
    if pair == ("folder", "shards"):  # the README's command line
        code = main(["compare", *map(str, runs), "--out", str(out), "--images", "2",
                     "--cost-batch", "2", "--no-progress"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip() == str(out / "report.html")
    else:
        api.compare(runs, out, images=2, cost_batch=2, cost_rounds=1, progress=False)
    with (out / "runs.csv").open() as f:
        assert sorted(r["run_dir"] for r in csv.DictReader(f)) == sorted(map(str, runs))
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(len(row) == 4 and all(row.values()) for row in rows)
    assert len(list((out / "images").glob("*-input.png"))) == 2


def test_outputs_are_aligned_by_image_not_position(sources, tmp_path):
    """The shard run streams its test images in another order (two workers over three
    shards); put in the folder run's order, its predictions are its model's predictions on
    those very files."""
    from lookcloser.data.samples import image_key
    from lookcloser.scoring import outputs_on_test

    folder, shards = sources["runs"]["folder"], sources["runs"]["shards"]
    report = api.compare([folder, shards], tmp_path / "r", images=0, cost_rounds=1,
                         progress=False)  # fmt: skip
    by_path = {r.path: r for g in report.groups for r in g.runs}
    first, other = by_path[folder], by_path[shards]
    assert first.keys == other.keys and np.array_equal(first.labels, other.labels)
    assert len(first.keys) == 12
    _, streamed = outputs_on_test(shards, progress=False)
    streamed_keys = [
        image_key(name, report.classes[int(label)], "")
        for name, label in zip(streamed.paths, streamed.labels, strict=True)
    ]
    assert sorted(streamed_keys) == sorted(first.keys) and streamed_keys != first.keys
    direct = api.load(shards).predict(first.paths, top_k=1)
    assert [report.classes[i] for i in other.predictions] == [p.classes[0] for p in direct]


def _refuse_evaluation(monkeypatch):
    import lookcloser.loader
    import lookcloser.scoring

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded or evaluated before the refusal")

    monkeypatch.setattr(lookcloser.scoring, "outputs_on_test", fail)
    monkeypatch.setattr(lookcloser.loader, "load_model", fail)


def test_other_classes_are_refused_first_naming_a_class(sources, tmp_path, monkeypatch, capsys):
    import lookcloser.compare

    _refuse_evaluation(monkeypatch)
    # Classes come from model.json alone: not even the data is listed.
    monkeypatch.setattr(lookcloser.compare, "read_test_set", lambda run: 1 / 0)
    folder, four = sources["runs"]["folder"], sources["four"]
    out = tmp_path / "report"
    assert main(["compare", str(folder), str(four), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    extra = json.loads((four / "model.json").read_text())["classes"][3]
    assert (
        f"{four} and {folder} have different classes: {four} has {extra} (4 classes), "
        f"{folder} does not (3 classes)"
    ) in err
    assert not out.exists()


def _copy_run(run: Path, to: Path, data_root: Path) -> Path:
    """The same model pointed at another folder (as if trained there)."""
    shutil.copytree(run, to)
    record = json.loads((to / "model.json").read_text())
    record["config"]["data"]["root"] = str(data_root)
    (to / "model.json").write_text(json.dumps(record))
    return to


def test_other_test_images_are_refused_naming_one(sources, tmp_path, monkeypatch):
    _refuse_evaluation(monkeypatch)
    folder = sources["runs"]["folder"]
    data = tmp_path / "data"
    shutil.copytree(sources["folder"], data)
    moved = sorted((data / "test").glob("*/0002.png"))[1]
    moved.rename(moved.with_name("0099.png"))
    other = _copy_run(folder, tmp_path / "other", data)
    cls = moved.parent.name
    with pytest.raises(DataError) as err:
        api.compare([folder, other], tmp_path / "report", progress=False)
    assert str(err.value).startswith(
        f"compare: {other} and {folder} were tested on different images: {other} has "
        f"{cls}/0099.png, {folder} does not (12 vs 12 test images)"
    )
    assert not (tmp_path / "report").exists()


def test_same_names_other_pictures_are_refused(sources, tmp_path, monkeypatch):
    _refuse_evaluation(monkeypatch)
    folder = sources["runs"]["folder"]
    data = tmp_path / "data"
    shutil.copytree(sources["folder"], data)
    images = sorted((data / "test").glob("*/*.png"))
    images[0].write_bytes(images[-1].read_bytes())
    other = _copy_run(folder, tmp_path / "other", data)
    name = f"{images[0].parent.name}/{images[0].name}"
    with pytest.raises(DataError, match=f"{name} is another picture in {other} than in"):
        api.compare([folder, other], tmp_path / "report", progress=False)


def test_shards_only_runs_explain_images_from_the_shards(sources, tmp_path):
    """With no run on files, the pictures come out of the test shards."""
    shards = sources["runs"]["shards"]
    copy = _copy_run(shards, tmp_path / "copy", sources["base"] / "shards")
    report = api.compare([shards, copy], tmp_path / "r", images=1, cost_batch=2, cost_rounds=1,
                         progress=False)  # fmt: skip
    assert len(list((report.out / "images").glob("*-input.png"))) == 1
