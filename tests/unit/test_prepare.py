"""prepare_data: the validation split (official or carved), declared metadata, unlabelled images."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookcloser.config import DataConfig
from lookcloser.data.prepare import UNLABELLED, prepare_data
from lookcloser.errors import ConfigError, DataError

CLASSES = ["a", "b", "c", "d"]


def _csv(tmp_path: Path, val_rows: int = 0) -> Path:
    """4 classes x 20 train + 3 test rows (+ val rows), with lat for every second image only."""
    lines = ["path,label,split,lat,lon,image_id"]
    n = 0
    for c in CLASSES:
        for split, count in (("train", 20), ("test", 3), ("val", val_rows)):
            for _ in range(count):
                lat = str(n % 50) if n % 2 else ""
                lines.append(f"img/{c}{n:03d}.png,{c},{split},{lat},{n % 7},{n}")
                n += 1
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="csv", root=str(root), verify_images=False, **kwargs)


def _paths(samples) -> list[str]:
    return [s.path for s in samples]


def test_val_split_is_seeded_stratified_and_disjoint(tmp_path):
    root = _csv(tmp_path)
    data = prepare_data(_cfg(root, val_fraction=0.25))
    assert data.val_split == "carved"
    assert len(data.val) == 4 * 5 and len(data.train) == 4 * 15 and len(data.test) == 4 * 3
    assert {s.label for s in data.val} == set(range(4))  # every class present
    assert all(sum(s.label == c for s in data.val) == 5 for c in range(4))  # stratified
    assert not set(_paths(data.val)) & set(_paths(data.train))
    assert not set(_paths(data.val)) & set(_paths(data.test))
    full = prepare_data(_cfg(root, val_fraction=0))
    assert full.val == [] and full.val_split == "none"
    assert sorted(_paths(data.train + data.val)) == sorted(_paths(full.train))
    assert _paths(full.test) == _paths(data.test)  # the test split is never touched
    again = prepare_data(_cfg(root, val_fraction=0.25))
    assert _paths(again.val) == _paths(data.val)  # same seed, same split
    other = prepare_data(_cfg(root, val_fraction=0.25, split_seed=1))
    assert set(_paths(other.val)) != set(_paths(data.val))
    assert data.summary()["val_images"] == 20 and data.summary()["val_split"] == "carved"


def test_official_val_split_is_used_as_it_is(tmp_path):
    data = prepare_data(_cfg(_csv(tmp_path, val_rows=2), val_fraction=0.25))
    assert data.val_split == "official"
    assert len(data.val) == 8 and len(data.train) == 80
    assert {int(Path(s.path).stem[1:]) % 25 for s in data.val} == {23, 24}  # the val rows


def test_declared_meta_keys_are_checked_against_the_data(tmp_path):
    root = _csv(tmp_path)
    assert prepare_data(_cfg(root, meta_keys=["lat", "lon"])).train  # lat missing on half: fine
    with pytest.raises(ConfigError, match="'elevation' in no training sample") as err:
        prepare_data(_cfg(root, meta_keys=["lat", "elevation"]))
    assert "found: lat, lon" in str(err.value)
    with pytest.raises(ConfigError, match="'image_id' identifies"):
        prepare_data(_cfg(root, meta_keys=["image_id"]))


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_unlabelled_folder_reads_sub_folders_as_images_not_classes(tmp_path):
    extra = tmp_path / "wild"
    _images(extra, ["x.png", "site1/y.jpg", "site2/deep/z.png", "notes.txt"])
    data = prepare_data(_cfg(_csv(tmp_path), unlabelled=str(extra)))
    assert sorted(Path(s.path).name for s in data.unlabelled) == ["x.png", "y.jpg", "z.png"]
    assert {s.label for s in data.unlabelled} == {UNLABELLED}
    assert data.summary()["unlabelled_images"] == 3


def test_unlabelled_source_spec_takes_that_sources_training_images(tmp_path):
    other = tmp_path / "other"
    _images(other, ["train/k/1.png", "train/k/2.png", "train/m/3.png", "test/k/4.png"])
    data = prepare_data(_cfg(_csv(tmp_path), unlabelled=f"imagefolder:{other}"))
    assert sorted(Path(s.path).name for s in data.unlabelled) == ["1.png", "2.png", "3.png"]


def test_unlabelled_images_of_the_evaluation_splits_are_refused(tmp_path):
    root = _csv(tmp_path)
    test_image = prepare_data(_cfg(root)).test[0].path
    _images(Path(test_image).parent, [Path(test_image).name])
    with pytest.raises(DataError, match="also in the val or test split"):
        prepare_data(_cfg(root, unlabelled=str(Path(test_image).parent)))


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("shards:/x", ConfigError, "shards are not supported"),
        ("no/such/folder", DataError, "is not a folder"),
    ],
)
def test_bad_unlabelled_specs(tmp_path, spec, error, message):
    with pytest.raises(error, match=message):
        prepare_data(_cfg(_csv(tmp_path), unlabelled=spec))
