"""The sources on local files: an ImageFolder tree (`imagefolder`) and CSV files (`csv`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
from lookcloser.data.csvrows import read_csv_rows
from lookcloser.data.duplicates import file_keys
from lookcloser.data.meta import DATE_KEY, DAY_OF_YEAR_KEY, day_of_year
from lookcloser.data.samples import (
    DatasetSplits,
    Sample,
    is_image_file,
    register_source,
    require_root,
    stratified_split,
)
from lookcloser.data.table import SampleTable
from lookcloser.errors import DataError

log = logging.getLogger(__name__)


def _labelled(
    pairs: list[tuple[str, str]], classes: list[str], metas: list[dict] | None = None
) -> Sequence[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    if metas is None and pairs:
        # Arrays, not an object per sample (data/table.py): a folder of millions of images
        # stays small, and DataLoader workers share it instead of copying it page by page.
        return SampleTable.build((p for p, _ in pairs), [index[c] for _, c in pairs])
    metas = metas or [{}] * len(pairs)
    return [Sample(p, index[c], m) for (p, c), m in zip(pairs, metas, strict=True)]


def _check_test_classes(train_classes: set[str], test_classes: set[str], where: str) -> None:
    unknown = sorted(test_classes - train_classes)
    if unknown:
        raise DataError(f"{where}: test classes not present in train: {', '.join(unknown[:5])}")


def _split_pairs(pairs: list[tuple[str, str]], cfg: DataConfig) -> tuple[list, list]:
    # The project's own train/test split: copies of one image stay on one side.
    keys = file_keys(p for p, _ in pairs)
    return stratified_split(
        pairs, cfg.test_fraction, cfg.split_seed, group=lambda item: keys[item[0]]
    )


# ---- imagefolder ----------------------------------------------------------------------------
def _scan_class_folders(folder: Path) -> list[tuple[str, str]]:
    pairs = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and is_image_file(path):
                pairs.append((str(path), class_dir.name))
    return pairs


@register_source("imagefolder")
def imagefolder(cfg: DataConfig) -> DatasetSplits:
    """`root/train/<class>/*`, `root/test/<class>/*` and optionally `root/val/<class>/*`, or
    `root/<class>/*` split by seed. Without test/, a val/ folder is the test split."""
    root = require_root(cfg)
    val: list[tuple[str, str]] = []
    if (root / "train").is_dir():
        train = _scan_class_folders(root / "train")
        has_test, has_val = (root / "test").is_dir(), (root / "val").is_dir()
        if has_test:
            test = _scan_class_folders(root / "test")
            val = _scan_class_folders(root / "val") if has_val else []
        elif has_val:
            test = _scan_class_folders(root / "val")
        else:
            train, test = _split_pairs(train, cfg)
    else:
        train, test = _split_pairs(_scan_class_folders(root), cfg)
    if not train:
        raise DataError(f"data.root: no images in class sub-folders of {root}")
    classes = sorted({c for _, c in train})
    _check_test_classes(set(classes), {c for _, c in test + val}, str(root))
    return DatasetSplits(
        classes,
        _labelled(train, classes),
        _labelled(test, classes),
        "imagefolder",
        val=_labelled(val, classes),
    )


# ---- csv --------------------------------------------------------------------------------------
@register_source("csv")
def csv_source(cfg: DataConfig) -> DatasetSplits:
    """A CSV with `path,label` columns, an optional `split` column (train/val/test) and metadata.

    `data.root` is the CSV file, or a directory with train.csv, test.csv and optionally
    val.csv. Relative paths are taken from the CSV's folder. Other columns become per-sample
    metadata (numbers where they parse as numbers, NaN where empty). Repeated rows of one
    image are collapsed (with a notice); one image with two labels is an error. Without a
    split column, rows are split by seed with copies of one image on the same side.
    """
    root = require_root(cfg)
    if root.is_dir():
        files = {s: root / f"{s}.csv" for s in SPLITS}
        if not files["train"].is_file():
            raise DataError(f"data.root: {root} has no train.csv (or pass the CSV file itself)")
        rows = [row for s, f in files.items() if f.is_file() for row in _read_csv(f, s, cfg)]
    else:
        rows = _read_csv(root, None, cfg)
    rows = _collapse_repeats(rows)
    if all(row.split is None for row in rows):
        keys = file_keys(row.path for row in rows)
        train, test = stratified_split(
            rows,
            cfg.test_fraction,
            cfg.split_seed,
            label=lambda row: row.label,
            order=lambda row: (row.path, row.label),
            group=lambda row: keys[row.path],
        )
        by_split = {"train": train, "test": test}
    else:
        by_split = {name: [row for row in rows if row.split == name] for name in SPLITS}
    classes = sorted({row.label for row in by_split["train"]})
    held = by_split["test"] + by_split.get("val", [])
    _check_test_classes(set(classes), {row.label for row in held}, str(root))

    def samples(name: str) -> list[Sample]:
        rows = by_split.get(name, [])
        return _labelled([(r.path, r.label) for r in rows], classes, [r.meta for r in rows])

    return DatasetSplits(classes, samples("train"), samples("test"), "csv", val=samples("val"))


SPLITS = ("train", "val", "test")


@dataclass
class _Row:
    path: str
    label: str
    meta: dict[str, Any]
    split: str | None
    where: str  # file:line
    cells: dict[str, str]  # the metadata cells as written, to tell repeats from conflicts


def _read_csv(path: Path, split: str | None, cfg: DataConfig) -> list[_Row]:
    columns, lines = read_csv_rows(path)
    missing = {"path", "label"} - set(columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; has {columns}")
    # Declared metadata must be numbers in every row: say which cell is not.
    numeric = [k for k in cfg.meta_keys if k in columns and k not in ("path", "label", "split")]
    dates = DAY_OF_YEAR_KEY in cfg.meta_keys and DATE_KEY in columns
    rows = []
    for line, row in lines:
        where = f"{path}:{line}"
        if not row["path"] or not row["label"]:
            raise DataError(f"{where}: empty path or label")
        row_split = split or (row.get("split") or None)
        if split is None and "split" in columns and row_split is None:
            raise DataError(f"{where}: empty split (expected train, val or test)")
        if row_split not in (None, *SPLITS):
            raise DataError(f"{where}: split must be train, val or test, got {row_split!r}")
        image = Path(row["path"])
        if not image.is_absolute():
            image = path.parent / image
        cells = {k: v for k, v in row.items() if k not in ("path", "label", "split")}
        meta = {k: _number_or_text(v) for k, v in cells.items()}
        for key in numeric:
            if isinstance(meta[key], str):
                raise DataError(
                    f"{where}: column {key!r} (declared in data.meta_keys) must be a number or "
                    f"empty, got {meta[key]!r}"
                )
        if dates and not _present(meta.get(DAY_OF_YEAR_KEY)):
            day_of_year(cells[DATE_KEY], f"{where}: column {DATE_KEY!r}")
        rows.append(_Row(str(image), row["label"], meta, row_split, where, cells))
    return rows


def _present(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def _collapse_repeats(rows: list[_Row]) -> list[_Row]:
    """One row per image and split: identical repeats dropped (with a notice); one image with
    two labels, or twice in a split with other metadata, is a DataError naming both lines."""
    keys = file_keys((row.path for row in rows), content=False)  # same file, any spelling
    first_label: dict[Hashable, _Row] = {}
    first_in_split: dict[tuple[Hashable, str | None], _Row] = {}
    kept, repeats = [], []
    for row in rows:
        key = keys[row.path]
        earlier = first_label.setdefault(key, row)
        if earlier.label != row.label:
            raise DataError(
                f"{row.path}: listed with two labels, {earlier.label!r} ({earlier.where}) and "
                f"{row.label!r} ({row.where}); an image has one label"
            )
        same = first_in_split.setdefault((key, row.split), row)
        if same is row:
            kept.append(row)
        elif same.cells != row.cells:
            raise DataError(
                f"{row.path}: listed twice with different metadata ({same.where} and "
                f"{row.where}); keep one row per image"
            )
        else:
            repeats.append((same, row))
    if repeats:
        same, row = repeats[0]
        log.warning(
            "data.source=csv: %d repeated row(s) of an image already listed were collapsed "
            "(e.g. %s repeats %s)",
            len(repeats),
            row.where,
            same.where,
        )
    return kept


def _number_or_text(value: str | None) -> Any:
    if value is None or value == "":
        return float("nan")
    try:
        return float(value)
    except ValueError:
        return value
