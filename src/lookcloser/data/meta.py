"""Metadata as a declared model input: which keys may be used, and one tensor form for them.

A model names its metadata in `data.meta_keys`; every path (training, evaluation, predict,
explain, ONNX) turns a sample's metadata dict into the same two rows: values (float32, 0 where
missing) and a mask (True where present), in the declared key order. A value missing on one
sample is masked for that sample only.

One key is derived: `day_of_year` (1-366) is read from a sample's `date` (ISO 8601 text,
`2021-06-15` or iNat's `2021-06-15 17:07:00+00:00`) when the sample has no `day_of_year` of
its own, so CSV date columns, iNat's JSON and `--meta` files can declare it directly.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lookcloser.data.csvrows import read_csv_rows
from lookcloser.errors import ConfigError, DataError

# Keys that name the image, the sample or its label. A model fed these learns the answer key
# (iNat's category_id is the label; CUB's image_id orders images by class), so they are
# refused. The rule: one of these names, or a name ending in one of the suffixes, after
# lower-casing and turning '-', '.' and spaces into '_'.
IDENTIFIER_NAMES = frozenset(
    {
        "id",
        "uid",
        "idx",
        "index",
        "key",
        "path",
        "file",
        "filename",
        "url",
        "image",
        "split",
        "label",
        "class",
        "category",
        "target",
        "species",
        "supercategory",
        "taxonomy",
        "hierarchy",
    }
)
IDENTIFIER_SUFFIXES = ("_id", "_ids", "_path", "_name", "_label", "_class", "_url", "_file")


def is_identifier(key: str) -> bool:
    """Whether a metadata key names the image, the sample or its label (see IDENTIFIER_NAMES)."""
    name = key.strip().lower()
    for char in "-. ":
        name = name.replace(char, "_")
    return name in IDENTIFIER_NAMES or name.endswith(IDENTIFIER_SUFFIXES) or name.startswith("_")


def check_meta_keys(keys: Sequence[str]) -> list[str]:
    """The declared keys, or a ConfigError for an identifier or a repeated key."""
    seen: set[str] = set()
    for key in keys:
        if not key or not key.strip():
            raise ConfigError("data.meta_keys: empty key name")
        if is_identifier(key):
            raise ConfigError(
                f"data.meta_keys: {key!r} identifies the image or its label, so a model would "
                "learn the answer from it; ids, labels, classes, paths and file names are refused "
                "(rename the column if it really is a measurement)"
            )
        if key in seen:
            raise ConfigError(f"data.meta_keys: {key!r} is listed twice")
        seen.add(key)
    return list(keys)


def meta_number(value: Any, key: str, where: str) -> float | None:
    """A metadata value as a float, None when missing (absent, empty, NaN); DataError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: meta {key!r}: expected a number, got {value!r}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        what = f"{len(value)} values" if isinstance(value, list | tuple) else repr(value)
        raise DataError(f"{where}: meta {key!r}: expected one number, got {what}")
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise DataError(f"{where}: meta {key!r}: expected a finite number, got {value}")
    return float(value)


DATE_KEY = "date"
DAY_OF_YEAR_KEY = "day_of_year"


def day_of_year(value: Any, where: str) -> float | None:
    """The day of the year (1 = 1 January) of an ISO 8601 date, None when missing; DataError
    for text that is not a date."""
    if _missing(value):
        return None
    if isinstance(value, datetime.date):  # datetimes are dates too
        return float(value.timetuple().tm_yday)
    try:
        parsed = datetime.datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise DataError(
            f"{where}: meta {DATE_KEY!r}: expected an ISO date (YYYY-MM-DD, optionally with a "
            f"time) to derive {DAY_OF_YEAR_KEY!r}, got {value!r}"
        ) from None
    return float(parsed.timetuple().tm_yday)


def meta_value(meta: Mapping[str, Any], key: str, where: str) -> float | None:
    """Sample `meta`'s value of `key` as a float (None when missing), deriving `day_of_year`
    from `date` when the sample has no own value."""
    number = meta_number(meta.get(key), key, where)
    if number is None and key == DAY_OF_YEAR_KEY:
        return day_of_year(meta.get(DATE_KEY), where)
    return number


def derived_keys(meta: Mapping[str, Any]) -> list[str]:
    """Keys a sample offers beyond its own numbers: `day_of_year` when its `date` parses."""
    try:
        return [DAY_OF_YEAR_KEY] if day_of_year(meta.get(DATE_KEY), "") is not None else []
    except DataError:
        return []


def meta_tensors(
    metas: Sequence[Mapping[str, Any]], keys: Sequence[str], names: Sequence[str] | None = None
) -> tuple[Tensor, Tensor]:
    """N x K float32 values (0 where missing) and N x K bool mask of N metadata dicts.

    `names` (paths) make errors point at the sample at fault.
    """
    shape = (len(metas), len(keys))
    if not keys:  # image-only models: no pass over millions of samples
        return torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
    values, present = [], []
    for row, meta in enumerate(metas):
        where = names[row] if names is not None else f"sample {row}"
        for key in keys:
            number = meta_value(meta, key, where)
            values.append(0.0 if number is None else number)
            present.append(number is not None)
    return (
        torch.tensor(values, dtype=torch.float32).reshape(shape),
        torch.tensor(present, dtype=torch.bool).reshape(shape),
    )


def check_meta_present(keys: Sequence[str], found: Sequence[str], where: str) -> None:
    """ConfigError naming a declared key that no training sample carries."""
    absent = [k for k in keys if k not in found]
    if absent:
        available = ", ".join(k for k in found if not is_identifier(k)) or "none"
        hint = (
            f" (a date enters as {DAY_OF_YEAR_KEY!r}, derived from it)"
            if DATE_KEY in absent
            else ""
        )
        raise ConfigError(
            f"data.meta_keys: {', '.join(repr(k) for k in absent)} in no training sample of "
            f"{where}; numeric keys found: {available}{hint}"
        )


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def same_path(path: str | Path) -> str:
    """A path in the form metadata files are matched by: absolute and normalised."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def read_meta_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per-image metadata from a CSV (a `path` column, one column per key) or a JSON file.

    JSON: an object mapping image path -> {key: value}, or a list of objects with a `path`.
    Relative image paths are taken from the file's folder (as with `data.source=csv`); the
    result maps `same_path(image)` -> its metadata dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--meta: {path} does not exist")
    if path.suffix.lower() == ".csv":
        columns, lines = read_csv_rows(path)
        if "path" not in columns:
            raise DataError(f"{path}: a metadata CSV needs a `path` column; has {columns}")
        rows = [row for _, row in lines]
    elif path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if isinstance(raw, dict):
            rows = [{"path": k, **v} for k, v in raw.items() if isinstance(v, dict)]
            if len(rows) != len(raw):
                raise DataError(f"{path}: expected image path -> {{key: value}} objects")
        elif isinstance(raw, list) and all(isinstance(r, dict) and "path" in r for r in raw):
            rows = raw
        else:
            raise DataError(f"{path}: expected an object of path -> metadata, or a list of objects")
    else:
        raise DataError(f"--meta: {path}: expected a .csv or .json file")
    out = {}
    for row in rows:
        image = Path(str(row.pop("path")))
        out[same_path(image if image.is_absolute() else path.parent / image)] = row
    return out
