"""The inat source holds its samples as arrays (data/table.py): the same samples as the JSON
describes, a few hundred bytes each rather than a Python object graph, kept compact through
validation carving, skipping and the training dataset."""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookcloser.data.images as images
from lookcloser.config import DataConfig
from lookcloser.data.loading import ImageDataset
from lookcloser.data.prepare import prepare_data, with_validation
from lookcloser.data.sources import SOURCES, Sample, numeric_meta_keys
from lookcloser.data.table import SampleTable
from lookcloser.errors import DataError

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")


def _category(cid: int) -> dict:
    genus = f"Genus{cid % 3}"
    return {
        "id": cid,
        "name": f"{genus} species{cid}",
        "supercategory": "Plants" if cid % 2 else "Birds",
        **{rank: f"{rank}{cid % 2}" for rank in RANKS[:-1]},
        "genus": genus,
    }


def _image(i: int, cid: int, split: str) -> dict:
    image = {"id": i, "file_name": f"{split}/{cid:05d}_x/{i:08d}.jpg", "width": 8, "height": 8}
    # Every kind of value the release has: present, null, missing; ints stay ints.
    image["latitude"] = None if i % 5 == 0 else 10.0 + i
    image["longitude"] = float("nan") if i % 7 == 0 else -70.5
    if i % 3:
        image["date"] = f"2020-0{1 + i % 9}-1{i % 10} 08:00:00+00:00"
    image["location_uncertainty"] = None if i % 4 == 0 else 10 * i
    return image


def _release(root: Path, n_train: int, n_val: int, classes: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cats = [_category(c) for c in reversed(range(classes))]  # listed out of order
    for name, count, offset in (("train", n_train, 0), ("val", n_val, 10**6)):
        images = [_image(offset + k, (k * 7) % classes, name) for k in range(count)]
        anns = [
            {"id": k, "image_id": offset + k, "category_id": (k * 7) % classes}
            for k in range(count)
        ]
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / f"{name}.json").write_text(json.dumps(data))
    return root


def _expected(root: Path, split: str) -> list[Sample]:
    """The samples, read straight from the JSON (the documented meaning of each field)."""
    data = json.loads((root / f"{split}.json").read_text())
    cats = {c["id"]: c for c in data["categories"]}
    label = {cid: i for i, cid in enumerate(sorted(cats))}
    of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    out = []
    for image in data["images"]:
        cat = cats[of[image["id"]]]
        taxonomy = {rank: cat[rank] for rank in RANKS} | {"species": cat["name"]}
        meta = {"category_id": cat["id"], "supercategory": cat["supercategory"]}
        meta["taxonomy"] = taxonomy
        for key in ("latitude", "longitude", "date", "location_uncertainty"):
            if image.get(key) is not None:
                meta[key] = image[key]
        out.append(Sample(str(root / image["file_name"]), label[cat["id"]], meta))
    return out


def _same(a: Sample, b: Sample) -> bool:
    if (a.path, a.label, a.meta.keys()) != (b.path, b.label, b.meta.keys()):
        return False
    for key, value in a.meta.items():
        other = b.meta[key]
        if isinstance(value, float) and math.isnan(value):
            if not (isinstance(other, float) and math.isnan(other)):
                return False
        elif value != other or type(value) is not type(other):
            return False
    return True


@pytest.fixture
def release(tmp_path) -> Path:
    return _release(tmp_path / "inat", 60, 12, 5)


def test_the_table_holds_the_samples_the_json_describes(release):
    splits = SOURCES["inat"](DataConfig(source="inat", root=str(release)))
    assert isinstance(splits.train, SampleTable) and isinstance(splits.test, SampleTable)
    for table, split in ((splits.train, "train"), (splits.test, "val")):
        expected = _expected(release, split)
        assert len(table) == len(expected)
        assert all(_same(a, b) for a, b in zip(table, expected, strict=True))
        assert all(_same(table[i], expected[i]) for i in (0, 7, -1))
        assert list(table.paths) == [s.path for s in expected]
        assert table.labels.tolist() == [s.label for s in expected]
        part = table[3:9]
        assert isinstance(part, SampleTable)
        assert all(_same(a, b) for a, b in zip(part, expected[3:9], strict=True))
        assert all(_same(a, b) for a, b in zip(table.take([5, 2]), expected[5:1:-3], strict=True))
    with pytest.raises(IndexError):
        splits.train[60]
    # Picklable (DataLoader workers under spawn), and the samples survive.
    again = pickle.loads(pickle.dumps(splits.train))
    assert all(_same(a, b) for a, b in zip(again, splits.train, strict=True))


def test_meta_keys_from_columns_are_those_of_every_sample(release):
    table = SOURCES["inat"](DataConfig(source="inat", root=str(release))).train
    keys = numeric_meta_keys(table)
    assert keys == numeric_meta_keys(list(table))  # the per-sample reading
    assert keys == [
        "category_id",
        "day_of_year",
        "latitude",
        "location_uncertainty",
        "longitude",
    ]
    # Rows without a latitude nor a date: neither offered, as per sample.
    no_lat = [i for i, s in enumerate(table) if "latitude" not in s.meta and "date" not in s.meta]
    subset = table.take(no_lat)
    assert numeric_meta_keys(subset) == numeric_meta_keys(list(subset))
    assert "latitude" not in numeric_meta_keys(subset)
    assert "day_of_year" not in numeric_meta_keys(subset)


def test_carving_and_training_keep_the_table_and_the_list_results(release):
    cfg = DataConfig(source="inat", root=str(release), verify_images=False, val_fraction=0.25)
    splits = SOURCES["inat"](cfg)
    carved, how = with_validation(splits, cfg)
    as_lists = splits.replace_samples(list(splits.train), list(splits.test))
    listed, _ = with_validation(as_lists, cfg)
    assert how == "carved" and isinstance(carved.train, SampleTable)
    assert isinstance(carved.val, SampleTable) and len(carved.val) == len(listed.val) > 0
    for ours, theirs in ((carved.train, listed.train), (carved.val, listed.val)):
        assert all(_same(a, b) for a, b in zip(ours, theirs, strict=True))
    data = prepare_data(cfg)
    assert isinstance(data.train, SampleTable) and data.val_split == "carved"
    assert [s.path for s in data.val] == [s.path for s in listed.val]
    dataset = ImageDataset(data.train, lambda image: image, 10**6, ["latitude", "day_of_year"])
    assert dataset.samples is data.train  # not copied into a list
    rows = [s.meta for s in data.train]
    assert dataset.meta_mask[:, 0].tolist() == ["latitude" in m for m in rows]
    assert dataset.meta[:, 0].tolist() == [m.get("latitude", 0.0) for m in rows]
    # `source:root` as the unlabelled stream: the same table, labels set to -1.
    unlabelled = splits.test.with_label(-1)
    assert isinstance(unlabelled, SampleTable)
    assert [s.label for s in unlabelled] == [-1] * len(splits.test)
    assert [s.path for s in unlabelled] == list(splits.test.paths)


def test_inconsistent_annotations_are_named(tmp_path):
    root = _release(tmp_path / "inat", 6, 2, 3)
    data = json.loads((root / "train.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    (root / "train.json").write_text(json.dumps(data))
    cfg = DataConfig(source="inat", root=str(root))
    with pytest.raises(
        DataError, match=r"train.json: image 4 \(train/.*04.jpg\) has no annotation"
    ):
        SOURCES["inat"](cfg)
    data["annotations"].append({"id": 99, "image_id": 4, "category_id": 42})
    (root / "train.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"train.json: image 4: category 42 not in the category"):
        SOURCES["inat"](cfg)


def test_the_table_is_compact(tmp_path):
    """At 20,000 images the samples take well under the ~750 bytes each that a list of
    Sample objects with meta dicts took (measured: about 120)."""
    root = _release(tmp_path / "inat", 20_000, 10, 100)
    cfg = DataConfig(source="inat", root=str(root))
    gc.collect()
    tracemalloc.start()
    try:
        splits = SOURCES["inat"](cfg)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_sample = held / (len(splits.train) + len(splits.test))
    assert per_sample < 250, f"{per_sample:.0f} bytes per sample"
    assert splits.train.nbytes / len(splits.train) < 120
    assert np.array_equal(splits.train.labels[:3], [0, 7, 14])


def test_verifying_a_table_skips_bad_images_and_keeps_a_table(release, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKCLOSER_CACHE", str(tmp_path / "cache"))
    splits = SOURCES["inat"](DataConfig(source="inat", root=str(release)))
    for i, path in enumerate([*splits.train.paths, *splits.test.paths]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 2 * i % 256, 0)).save(path, "PNG")
    bad = splits.train.path(10)
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for path in [*splits.train.paths, *splits.test.paths]:
        os.utime(path, (1e9, 1e9))  # long ago: outside the racy window
    decoded = []
    decode = images.decode_bytes
    monkeypatch.setattr(images, "decode_bytes", lambda p, *a: decoded.append(p) or decode(p, *a))
    cfg = DataConfig(source="inat", root=str(release), on_bad_image="skip", val_fraction=0.25)
    data = prepare_data(cfg)
    assert isinstance(data.train, SampleTable) and isinstance(data.test, SampleTable)
    assert data.skipped == [f"{bad}: truncated or corrupt: unreadable PNG header"]
    assert bad not in [*data.train.paths, *data.val.paths]
    assert len(data.train) + len(data.val) == 59 and len(decoded) == 72
    decoded.clear()
    again = prepare_data(cfg)
    assert decoded == [] and again.skipped == data.skipped
    assert list(again.val.paths) == list(data.val.paths)
