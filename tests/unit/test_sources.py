"""Data sources: imagefolder and csv layouts, seeded splits and the errors users see."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lookcloser.config import DataConfig
from lookcloser.data.sources import build_source, stratified_split
from lookcloser.errors import DataError


def _touch_images(folder: Path, names: list[str]) -> None:
    # Sources list files by extension only; content is checked at decode time. Distinct
    # bytes per file: copies of one image are kept on one side of a split.
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" + str(folder / name).encode())


def _cfg(source: str, root, **kw) -> DataConfig:
    return DataConfig(source=source, root=str(root), **kw)


# ---- imagefolder ----------------------------------------------------------------------------
def test_imagefolder_train_and_test(tmp_path):
    """train/ and test/ sub-folders give sorted classes and matching labels."""
    _touch_images(tmp_path / "train" / "wren", ["a.png", "b.jpg"])
    _touch_images(tmp_path / "train" / "finch", ["c.png"])
    _touch_images(tmp_path / "train" / "finch" / "nested", ["d.png"])
    _touch_images(tmp_path / "train" / "finch", ["notes.txt", ".hidden.png"])
    _touch_images(tmp_path / "test" / "wren", ["e.png"])
    splits = build_source(_cfg("imagefolder", tmp_path))
    assert splits.classes == ["finch", "wren"]
    train = {Path(s.path).name: s.label for s in splits.train}
    assert train == {"a.png": 1, "b.jpg": 1, "c.png": 0, "d.png": 0}
    assert [(Path(s.path).name, s.label) for s in splits.test] == [("e.png", 1)]


def test_imagefolder_val_folder_is_test(tmp_path):
    """A val/ folder is used as the test split when there is no test/."""
    _touch_images(tmp_path / "train" / "a", ["1.png", "2.png"])
    _touch_images(tmp_path / "val" / "a", ["3.png"])
    splits = build_source(_cfg("imagefolder", tmp_path))
    assert [Path(s.path).name for s in splits.test] == ["3.png"]
    assert splits.val == []


def test_imagefolder_val_folder_beside_test_is_the_val_split(tmp_path):
    _touch_images(tmp_path / "train" / "a", ["1.png", "2.png"])
    _touch_images(tmp_path / "train" / "b", ["5.png"])
    _touch_images(tmp_path / "val" / "b", ["3.png"])
    _touch_images(tmp_path / "test" / "a", ["4.png"])
    splits = build_source(_cfg("imagefolder", tmp_path))
    assert [(Path(s.path).name, s.label) for s in splits.val] == [("3.png", 1)]
    assert [Path(s.path).name for s in splits.test] == ["4.png"]
    _touch_images(tmp_path / "val" / "z", ["6.png"])
    with pytest.raises(DataError, match="not present in train: z"):
        build_source(_cfg("imagefolder", tmp_path))


def test_csv_val_split_from_a_column_and_from_val_csv(tmp_path):
    (tmp_path / "all.csv").write_text(
        "path,label,split\na.png,x,train\nb.png,y,train\nc.png,x,val\nd.png,y,test\n"
    )
    splits = build_source(_cfg("csv", tmp_path / "all.csv"))
    assert [Path(s.path).name for s in splits.val] == ["c.png"]
    assert [Path(s.path).name for s in splits.test] == ["d.png"]
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.csv").write_text("path,label\na.png,x\nb.png,y\n")
    (folder / "val.csv").write_text("path,label\nc.png,y\n")
    (folder / "test.csv").write_text("path,label\nd.png,x\n")
    splits = build_source(_cfg("csv", folder))
    assert [(Path(s.path).name, s.label) for s in splits.val] == [("c.png", 1)]
    assert [Path(s.path).name for s in splits.test] == ["d.png"]


def _single_folder(tmp_path: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        _touch_images(tmp_path / name, [f"{name}_{i:02d}.png" for i in range(n)])
    return tmp_path


def test_imagefolder_single_folder_split(tmp_path):
    """`root/<class>/*` is split per class by seed; every class keeps a train image."""
    root = _single_folder(tmp_path, {"a": 10, "b": 5, "c": 1})
    splits = build_source(_cfg("imagefolder", root, test_fraction=0.2, split_seed=0))
    assert splits.classes == ["a", "b", "c"]
    train_labels = [s.label for s in splits.train]
    test_labels = [s.label for s in splits.test]
    assert test_labels.count(0) == 2 and test_labels.count(1) == 1
    assert train_labels.count(2) == 1 and 2 not in test_labels
    assert not {s.path for s in splits.train} & {s.path for s in splits.test}
    assert len(splits.train) + len(splits.test) == 16


def test_stratified_split_properties():
    """Seeded: deterministic, a different seed differs, each class keeps >= 1 train item."""
    items = [(f"{c}/{i}.png", c) for c in "xyz" for i in range(20)]
    items += [("w/0.png", "w"), ("v/0.png", "v"), ("v/1.png", "v")]
    train, test = stratified_split(items, 0.5, seed=1)
    assert stratified_split(list(reversed(items)), 0.5, seed=1) == (train, test)
    assert stratified_split(items, 0.5, seed=2) != (train, test)
    assert {c for _, c in train} == {"v", "w", "x", "y", "z"}
    assert sorted(train + test) == sorted(items)
    for c in "xyz":
        assert sum(1 for _, k in test if k == c) == 10


def test_stratified_split_rejects_bad_fraction():
    """test_fraction outside (0, 1) is a DataError naming the key."""
    with pytest.raises(DataError, match="data.test_fraction"):
        stratified_split([("a.png", "a")], 1.0, seed=0)


def test_imagefolder_test_class_missing_from_train(tmp_path):
    """A test class that train lacks is an error naming the class."""
    _touch_images(tmp_path / "train" / "a", ["1.png"])
    _touch_images(tmp_path / "test" / "zebra", ["2.png"])
    with pytest.raises(DataError, match="zebra"):
        build_source(_cfg("imagefolder", tmp_path))


def test_missing_root(tmp_path):
    """A missing or unset data.root is a DataError naming data.root."""
    with pytest.raises(DataError, match="data.root") as err:
        build_source(_cfg("imagefolder", tmp_path / "nope"))
    assert "nope" in str(err.value)
    with pytest.raises(DataError, match="data.root is required"):
        build_source(DataConfig(source="imagefolder", root=None))


def test_imagefolder_without_images(tmp_path):
    """A root whose class folders hold no images is an error, not an empty dataset."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError):
        build_source(_cfg("imagefolder", tmp_path))


# ---- csv ------------------------------------------------------------------------------------
def test_csv_single_file_with_split_and_meta(tmp_path):
    """A split column, numeric metadata as floats, empty as nan, text kept as text."""
    (tmp_path / "data").mkdir()
    csv_file = tmp_path / "data" / "labels.csv"
    csv_file.write_text(
        "path,label,split,lat,site\n"
        "img/1.jpg,owl,train,45.5,north\n"
        "img/2.jpg,hawk,train,,south\n"
        "/abs/3.jpg,owl,test,-3,north\n"
    )
    splits = build_source(_cfg("csv", csv_file))
    assert splits.classes == ["hawk", "owl"]
    assert [s.path for s in splits.train] == [
        str(tmp_path / "data" / "img" / "1.jpg"),
        str(tmp_path / "data" / "img" / "2.jpg"),
    ]
    assert [s.label for s in splits.train] == [1, 0]
    first, second = splits.train
    assert first.meta == {"lat": 45.5, "site": "north"}
    assert math.isnan(second.meta["lat"]) and second.meta["site"] == "south"
    (test,) = splits.test
    assert test.path == "/abs/3.jpg" and test.label == 1
    assert test.meta["lat"] == -3.0 and isinstance(test.meta["lat"], float)


def test_csv_directory_with_train_and_test(tmp_path):
    """A directory with train.csv and test.csv; relative paths from the CSVs' folder."""
    (tmp_path / "train.csv").write_text("path,label\na.png,x\nb.png,y\n")
    (tmp_path / "test.csv").write_text("path,label\nc.png,y\n")
    splits = build_source(_cfg("csv", tmp_path))
    assert splits.classes == ["x", "y"]
    assert [(s.path, s.label) for s in splits.train] == [
        (str(tmp_path / "a.png"), 0),
        (str(tmp_path / "b.png"), 1),
    ]
    assert [(s.path, s.label) for s in splits.test] == [(str(tmp_path / "c.png"), 1)]


def test_csv_without_split_column_is_split_by_seed(tmp_path):
    """Without a split column the rows are split per class, keeping metadata."""
    rows = "".join(f"{c}{i}.png,{c},{i}\n" for c in "ab" for i in range(5))
    csv_file = tmp_path / "all.csv"
    csv_file.write_text("path,label,weight\n" + rows)
    splits = build_source(_cfg("csv", csv_file, test_fraction=0.4))
    assert len(splits.train) == 6 and len(splits.test) == 4
    for sample in splits.train + splits.test:
        assert sample.meta["weight"] == float(Path(sample.path).stem[1:])


def test_csv_directory_without_train_csv(tmp_path):
    """A directory without train.csv says so."""
    with pytest.raises(DataError, match="train.csv"):
        build_source(_cfg("csv", tmp_path))


def test_csv_missing_column_names_file_and_column(tmp_path):
    """A CSV without a label column is an error naming the file and the column."""
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("path,class\na.png,x\n")
    with pytest.raises(DataError, match="label") as err:
        build_source(_cfg("csv", csv_file))
    assert str(csv_file) in str(err.value)


def test_csv_bad_split_value_names_line(tmp_path):
    """A split value other than train/test is reported as file:line."""
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("path,label,split\na.png,x,train\nb.png,x,validation\n")
    with pytest.raises(DataError, match="validation") as err:
        build_source(_cfg("csv", csv_file))
    assert f"{csv_file}:3" in str(err.value)


def test_csv_empty_label_names_line(tmp_path):
    """An empty label is reported as file:line."""
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("path,label\na.png,\n")
    with pytest.raises(DataError, match="empty path or label") as err:
        build_source(_cfg("csv", csv_file))
    assert f"{csv_file}:2" in str(err.value)


def test_csv_test_class_missing_from_train(tmp_path):
    """A test-only class in a CSV is an error naming it."""
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("path,label,split\na.png,x,train\nb.png,ghost,test\n")
    with pytest.raises(DataError, match="ghost"):
        build_source(_cfg("csv", csv_file))


def test_unknown_source_lists_available(tmp_path):
    """An unknown data.source lists the registered sources."""
    with pytest.raises(DataError, match="unknown source 'nosuch'") as err:
        build_source(_cfg("nosuch", tmp_path))
    message = str(err.value)
    assert "available:" in message
    for name in ("csv", "imagefolder", "synthetic"):
        assert name in message


def test_csv_with_byte_order_mark(tmp_path):
    """A UTF-8 CSV saved with a byte-order mark (as Excel does) is read normally."""
    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes("path,label\na.png,x\nb.png,x\n".encode("utf-8-sig"))
    splits = build_source(_cfg("csv", csv_file, test_fraction=0.5))
    assert splits.classes == ["x"]
