"""Metadata as a declared input: the identifier rule, one tensor form, metadata files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lookcloser.api import as_config, check_config
from lookcloser.data.meta import (
    check_meta_keys,
    check_meta_present,
    is_identifier,
    meta_number,
    meta_tensors,
    read_meta_file,
    same_path,
)
from lookcloser.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "key",
    ["id", "image_id", "category_id", "class_id", "label", "class", "Category", "path",
     "file_name", "File-Name", "image_path", "common_name", "species", "supercategory",
     "__key__", "split", "image id"],
)  # fmt: skip
def test_identifiers_are_refused(key):
    assert is_identifier(key)
    with pytest.raises(ConfigError, match="identifies the image or its label"):
        check_meta_keys(["lat", key])


@pytest.mark.parametrize("key", ["lat", "latitude", "longitude", "elevation", "date_ordinal"])
def test_measurements_are_accepted(key):
    assert not is_identifier(key)
    assert check_meta_keys([key]) == [key]


def test_repeated_key_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        check_meta_keys(["lat", "lat"])


def test_check_config_refuses_identifiers_and_methods_without_metadata():
    """Before any data is read: an id key, or metadata for a method that does not take it."""
    with pytest.raises(ConfigError, match="'category_id' identifies"):
        check_config(as_config(None, ["data.meta_keys=[lat, category_id]"]))
    with pytest.raises(ConfigError, match="method 'baseline' does not use metadata"):
        check_config(as_config(None, ["data.meta_keys=[lat]"]))
    assert check_config(as_config(None, [])).data.meta_keys == []


def test_key_absent_from_every_sample_is_named():
    with pytest.raises(ConfigError, match="'elevation' in no training sample") as err:
        check_meta_present(["lat", "elevation"], ["image_id", "lat", "lon"], "data.source=csv")
    assert "found: lat, lon" in str(err.value)  # identifiers are not offered
    check_meta_present(["lat"], ["lat", "lon"], "x")


def test_meta_tensors_mask_each_missing_value_on_its_sample():
    """Absent, None, empty text and NaN are missing (0, masked); other values are kept."""
    metas = [
        {"lat": 1.5, "lon": "2"},
        {"lon": 3},
        {"lat": None, "lon": ""},
        {"lat": math.nan, "lon": True, "other": "text"},
    ]
    values, mask = meta_tensors(metas, ["lat", "lon"])
    assert values.dtype == torch.float32 and mask.dtype == torch.bool
    assert values.tolist() == [[1.5, 2.0], [0.0, 3.0], [0.0, 0.0], [0.0, 1.0]]
    assert mask.tolist() == [[True, True], [False, True], [False, False], [False, True]]
    assert meta_tensors(metas, [])[0].shape == (4, 0)


@pytest.mark.parametrize(
    "value, problem",
    [("north", "expected a number, got 'north'"), ([1, 2, 3, 4], "got 4 values"),
     (math.inf, "finite")],
)  # fmt: skip
def test_non_numeric_values_name_the_sample(value, problem):
    with pytest.raises(DataError, match=problem) as err:
        meta_tensors([{"lat": 1.0}, {"lat": value}], ["lat"], ["a.png", "b.png"])
    assert str(err.value).startswith("b.png: meta 'lat'")
    assert meta_number("  ", "lat", "x") is None


def test_read_meta_file_csv_and_json(tmp_path):
    """CSV (a path column) and JSON (path -> dict, or a list) map absolute paths to dicts."""
    (tmp_path / "m.csv").write_text("path,lat,lon\na.png,1.5,\nsub/b.png,,4\n")
    from_csv = read_meta_file(tmp_path / "m.csv")
    assert from_csv == {
        same_path(tmp_path / "a.png"): {"lat": "1.5", "lon": ""},
        same_path(tmp_path / "sub" / "b.png"): {"lat": "", "lon": "4"},
    }
    values, mask = meta_tensors(list(from_csv.values()), ["lat", "lon"])
    assert values.tolist() == [[1.5, 0.0], [0.0, 4.0]]
    assert mask.tolist() == [[True, False], [False, True]]
    absolute = str(tmp_path / "c.png")
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"lat": 2}, absolute: {"lon": 3}}))
    assert read_meta_file(tmp_path / "m.json") == {
        same_path(tmp_path / "a.png"): {"lat": 2},
        same_path(absolute): {"lon": 3},
    }
    (tmp_path / "l.json").write_text(json.dumps([{"path": "a.png", "lat": 7}]))
    assert read_meta_file(tmp_path / "l.json") == {same_path(tmp_path / "a.png"): {"lat": 7}}


def test_read_meta_file_errors(tmp_path):
    (tmp_path / "m.csv").write_text("file,lat\na.png,1\n")
    with pytest.raises(DataError, match="needs a `path` column"):
        read_meta_file(tmp_path / "m.csv")
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object"):
        read_meta_file(tmp_path / "m.json")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(DataError, match="expected a .csv or .json"):
        read_meta_file(tmp_path / "m.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_meta_file(tmp_path / "none.csv")
