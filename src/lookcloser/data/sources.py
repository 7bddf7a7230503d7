"""Data sources behind one registry: each turns a DataConfig into labelled samples.

A source knows file layouts and annotation formats, nothing about tensors or training.
Adding a dataset is one function decorated with `@register_source("name")`.
"""

from __future__ import annotations

import csv
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
from lookcloser.data.meta import derived_keys
from lookcloser.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True)
class Sample:
    """One labelled image: its path, class index and optional metadata (boxes, location...)."""

    path: str
    label: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DatasetSplits:
    """A dataset's class names and its train, test and (where the source has one) val samples."""

    classes: list[str]
    train: list[Sample]
    test: list[Sample]
    name: str = ""
    # Which extra annotations the samples carry in `meta` (e.g. ["bbox", "parts"]).
    annotations: list[str] = field(default_factory=list)
    # The source's own validation split (empty: none; training may carve one from train).
    val: list[Sample] = field(default_factory=list)

    def replace_samples(
        self, train: list[Sample], test: list[Sample], val: list[Sample] | None = None
    ) -> DatasetSplits:
        """A copy with other sample lists (after skipping bad images, say)."""
        val = self.val if val is None else val
        return DatasetSplits(self.classes, train, test, self.name, list(self.annotations), val)


def numeric_meta_keys(samples: list[Sample]) -> list[str]:
    """Meta keys that can be declared in `data.meta_keys`: a single number in at least one
    sample, and a number or missing (absent, empty, NaN) in every other; plus `day_of_year`
    where samples carry a `date` (see data.meta)."""
    kinds: dict[str, bool] = {}  # key -> seen with a number (False: missing only so far)
    refused: set[str] = set()
    for sample in samples:
        for key in derived_keys(sample.meta):
            if key not in refused:
                kinds[key] = True
        for key, value in sample.meta.items():
            if key in refused:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float | None):
                refused.add(key)
                kinds.pop(key, None)
            else:
                number = value is not None and not (isinstance(value, float) and math.isnan(value))
                kinds[key] = kinds.get(key, False) or number
    return sorted(k for k, number in kinds.items() if number)


SourceFn = Callable[[DataConfig], DatasetSplits]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a data source under `name` (selected with `data.source=name`)."""

    def wrap(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return wrap


def build_source(cfg: DataConfig) -> DatasetSplits:
    """Load the samples of the source that `cfg.source` names."""
    _import_builtin_sources()
    if cfg.source not in SOURCES:
        raise DataError(
            f"data.source: unknown source {cfg.source!r}; available: {', '.join(sorted(SOURCES))}"
        )
    splits = SOURCES[cfg.source](cfg)
    if not splits.train:
        raise DataError(f"data source {cfg.source!r} at {cfg.root}: no training images found")
    return splits


def source_names() -> list[str]:
    """The registered source names (built-in ones included)."""
    _import_builtin_sources()
    return sorted(SOURCES)


def _import_builtin_sources() -> None:
    # Sources in other modules register themselves on import.
    from lookcloser.data import (
        datasets,  # noqa: F401
        synthetic,  # noqa: F401
    )


def require_root(cfg: DataConfig) -> Path:
    """`cfg.root` as an existing directory or file, or a DataError that says what is missing."""
    if not cfg.root:
        raise DataError(f"data.root is required for data.source={cfg.source}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root: {root} does not exist")
    return root


def is_image_file(path: Path) -> bool:
    """Whether a file name has an image extension (content is checked at decode time)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def stratified_split(
    items: list,
    fraction: float,
    seed: int | str,
    label: Callable[[Any], Any] = lambda item: item[1],
    order: Callable[[Any], Any] | None = None,
    key: str = "data.test_fraction",
) -> tuple[list, list]:
    """Split items per class with a seeded shuffle into (kept, held out); every class keeps one.

    Items are (path, class) pairs by default; `label` and `order` (the sort before the
    shuffle, so the result does not depend on input order) adapt it to other items.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{key}: expected a value in (0, 1), got {fraction}")
    by_class: dict[Any, list] = defaultdict(list)
    for item in items:
        by_class[label(item)].append(item)
    rng = random.Random(seed)
    kept, held = [], []
    for name in sorted(by_class):
        group = sorted(by_class[name], key=order)
        rng.shuffle(group)
        n_held = min(round(len(group) * fraction), len(group) - 1)
        held += group[:n_held]
        kept += group[n_held:]
    return kept, held


def _labelled(
    pairs: list[tuple[str, str]], classes: list[str], metas: list[dict] | None = None
) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    metas = metas or [{}] * len(pairs)
    return [Sample(p, index[c], m) for (p, c), m in zip(pairs, metas, strict=True)]


def _check_test_classes(train_classes: set[str], test_classes: set[str], where: str) -> None:
    unknown = sorted(test_classes - train_classes)
    if unknown:
        raise DataError(f"{where}: test classes not present in train: {', '.join(unknown[:5])}")


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
            train, test = stratified_split(train, cfg.test_fraction, cfg.split_seed)
    else:
        train, test = stratified_split(_scan_class_folders(root), cfg.test_fraction, cfg.split_seed)
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
    metadata (numbers where they parse as numbers, NaN where empty).
    """
    root = require_root(cfg)
    if root.is_dir():
        files = {s: root / f"{s}.csv" for s in SPLITS}
        if not files["train"].is_file():
            raise DataError(f"data.root: {root} has no train.csv (or pass the CSV file itself)")
        rows = [row for s, f in files.items() if f.is_file() for row in _read_csv(f, s)]
    else:
        rows = _read_csv(root, None)
    if all(split is None for *_, split in rows):
        pairs = [(p, c) for p, c, _, _ in rows]
        meta_of = {p: m for p, _, m, _ in rows}
        train, test = stratified_split(pairs, cfg.test_fraction, cfg.split_seed)
        by_split = {
            "train": [(p, c, meta_of[p]) for p, c in train],
            "test": [(p, c, meta_of[p]) for p, c in test],
        }
    else:
        by_split = {name: [(p, c, m) for p, c, m, s in rows if s == name] for name in SPLITS}
    classes = sorted({c for _, c, _ in by_split["train"]})
    held = by_split["test"] + by_split.get("val", [])
    _check_test_classes(set(classes), {c for _, c, _ in held}, str(root))

    def samples(name: str) -> list[Sample]:
        rows = by_split.get(name, [])
        return _labelled([(p, c) for p, c, _ in rows], classes, [m for *_, m in rows])

    return DatasetSplits(classes, samples("train"), samples("test"), "csv", val=samples("val"))


SPLITS = ("train", "val", "test")


def _read_csv(path: Path, split: str | None) -> list[tuple[str, str, dict, str | None]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's BOM
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = {"path", "label"} - set(columns)
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(sorted(missing))}; has {columns}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["path"] or not row["label"]:
                raise DataError(f"{path}:{line}: empty path or label")
            row_split = split or (row.get("split") or None)
            if split is None and "split" in columns and row_split is None:
                raise DataError(f"{path}:{line}: empty split (expected train, val or test)")
            if row_split not in (None, *SPLITS):
                raise DataError(
                    f"{path}:{line}: split must be train, val or test, got {row_split!r}"
                )
            image = Path(row["path"])
            if not image.is_absolute():
                image = path.parent / image
            meta = {
                k: _number_or_text(v) for k, v in row.items() if k not in ("path", "label", "split")
            }
            rows.append((str(image), row["label"], meta, row_split))
    return rows


def _number_or_text(value: str | None) -> Any:
    if value is None or value == "":
        return float("nan")
    try:
        return float(value)
    except ValueError:
        return value
