"""Data sources behind one registry: each turns a DataConfig into labelled samples.

A source knows file layouts and annotation formats, nothing about tensors or training.
Adding a dataset is one function decorated with `@register_source("name")`.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
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
    """A dataset's class names and its train and test samples."""

    classes: list[str]
    train: list[Sample]
    test: list[Sample]
    name: str = ""
    # Which extra annotations the samples carry in `meta` (e.g. ["bbox", "parts"]).
    annotations: list[str] = field(default_factory=list)

    def replace_samples(self, train: list[Sample], test: list[Sample]) -> DatasetSplits:
        """A copy with other sample lists (after skipping bad images, say)."""
        return DatasetSplits(self.classes, train, test, self.name, list(self.annotations))


def numeric_meta_keys(samples: list[Sample]) -> list[str]:
    """Meta keys whose values are numbers, or number lists of one length, in every sample."""
    if not samples:
        return []
    shapes: dict[str, set] = {k: set() for k in samples[0].meta}
    for sample in samples:
        for key in list(shapes):
            if key not in sample.meta:
                del shapes[key]
            else:
                shapes[key].add(_numeric_shape(sample.meta[key]))
    return sorted(k for k, found in shapes.items() if len(found) == 1 and None not in found)


def _numeric_shape(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return 0
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return len(value)
    return None


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
    items: list[tuple[str, str]], test_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split (path, class) pairs per class with a seeded shuffle; every class keeps a train image."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction: expected a value in (0, 1), got {test_fraction}")
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    rng = random.Random(seed)
    train, test = [], []
    for name in sorted(by_class):
        group = sorted(by_class[name])
        rng.shuffle(group)
        n_test = min(round(len(group) * test_fraction), len(group) - 1)
        test += group[:n_test]
        train += group[n_test:]
    return train, test


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
    """`root/train/<class>/*` and `root/test/<class>/*`, or `root/<class>/*` split by seed."""
    root = require_root(cfg)
    if (root / "train").is_dir():
        train = _scan_class_folders(root / "train")
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if test_dir is None:
            train, test = stratified_split(train, cfg.test_fraction, cfg.split_seed)
        else:
            test = _scan_class_folders(test_dir)
    else:
        train, test = stratified_split(_scan_class_folders(root), cfg.test_fraction, cfg.split_seed)
    if not train:
        raise DataError(f"data.root: no images in class sub-folders of {root}")
    classes = sorted({c for _, c in train})
    _check_test_classes(set(classes), {c for _, c in test}, str(root))
    return DatasetSplits(
        classes, _labelled(train, classes), _labelled(test, classes), "imagefolder"
    )


# ---- csv --------------------------------------------------------------------------------------
@register_source("csv")
def csv_source(cfg: DataConfig) -> DatasetSplits:
    """A CSV with `path,label` columns, an optional `split` column (train/test) and metadata.

    `data.root` is the CSV file, or a directory with train.csv and test.csv. Relative paths
    are taken from the CSV's folder. Other columns become per-sample metadata (numbers where
    they parse as numbers).
    """
    root = require_root(cfg)
    if root.is_dir():
        files = {s: root / f"{s}.csv" for s in ("train", "test")}
        if not files["train"].is_file():
            raise DataError(f"data.root: {root} has no train.csv (or pass the CSV file itself)")
        rows = _read_csv(files["train"], "train")
        if files["test"].is_file():
            rows += _read_csv(files["test"], "test")
    else:
        rows = _read_csv(root, None)
    if all(split is None for *_, split in rows):
        pairs = [(p, c) for p, c, _, _ in rows]
        meta_of = {p: m for p, _, m, _ in rows}
        train, test = stratified_split(pairs, cfg.test_fraction, cfg.split_seed)
        train_rows = [(p, c, meta_of[p]) for p, c in train]
        test_rows = [(p, c, meta_of[p]) for p, c in test]
    else:
        train_rows = [(p, c, m) for p, c, m, s in rows if s == "train"]
        test_rows = [(p, c, m) for p, c, m, s in rows if s == "test"]
    classes = sorted({c for _, c, _ in train_rows})
    _check_test_classes(set(classes), {c for _, c, _ in test_rows}, str(root))

    def samples(rows):
        return _labelled([(p, c) for p, c, _ in rows], classes, [m for *_, m in rows])

    return DatasetSplits(classes, samples(train_rows), samples(test_rows), "csv")


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
                raise DataError(f"{path}:{line}: empty split (expected train or test)")
            if row_split not in (None, "train", "test"):
                raise DataError(f"{path}:{line}: split must be train or test, got {row_split!r}")
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
