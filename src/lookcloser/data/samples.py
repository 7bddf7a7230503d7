"""Labelled samples and the registry of data sources: what every source returns, and how
one registers (`@register_source("name")`), with the split helpers sources share."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
from lookcloser.data.meta import derived_keys
from lookcloser.errors import DataError

log = logging.getLogger(__name__)


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


def numeric_meta_keys(samples: Sequence[Sample]) -> list[str]:
    """Meta keys that can be declared in `data.meta_keys`: a single number in at least one
    sample, and a number or missing (absent, empty, NaN) in every other; plus `day_of_year`
    where samples carry a `date` (see data.meta)."""
    # A SampleTable (data/table.py, which imports this module) answers from its columns.
    from_columns = getattr(samples, "numeric_meta_keys", None)
    if from_columns is not None and (found := from_columns()) is not None:
        return found
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


def require_root(cfg: DataConfig) -> Path:
    """`cfg.root` as an existing directory or file, or a DataError that says what is missing."""
    if not cfg.root:
        raise DataError(f"data.root is required for data.source={cfg.source}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root: {root} does not exist")
    return root


def image_key(path: str, class_name: str, base: str | None = None) -> str:
    """How a labelled image is known across sources (a folder, a CSV of its files, shards
    packed from either): `<class>/<its path below the class's folder>`, else its path relative
    to `base` (the data root; "" for a path relative already), else its file name."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    folders = parts[:-1]
    if class_name in folders:
        below = parts[len(folders) - folders[::-1].index(class_name) :]
    elif base == "" and ".." not in parts and not str(path).startswith("/"):
        below = parts
    elif base:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
        below = relative.replace("\\", "/").split("/")
        if ".." in below:  # not under the root
            below = parts[-1:]
    else:
        below = parts[-1:]
    return "/".join([class_name, *below])


def root_folder(root: str | Path) -> str:
    """The folder that a source's `data.root` names (a CSV file: its folder)."""
    root = Path(root).expanduser()
    return str(root if root.is_dir() or not root.suffix else root.parent)


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
    group: Callable[[Any], Hashable] | None = None,
) -> tuple[list, list]:
    """Split items per class with a seeded shuffle into (kept, held out); every class keeps one.

    Items are (path, class) pairs by default; `label` and `order` (the sort before the
    shuffle, so the result does not depend on input order) adapt it to other items. Items of
    one `group` (duplicates: see `data.duplicates.file_keys`) land on the same side, counted
    in the class of their first item; without duplicates the split is the same as without
    `group`.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{key}: expected a value in (0, 1), got {fraction}")
    members: dict[Any, list] = defaultdict(list)
    for i, item in enumerate(items):
        members[group(item) if group is not None else ("item", i)].append(item)
    by_class: dict[Any, list[list]] = defaultdict(list)
    for its in members.values():
        its.sort(key=order)
        by_class[label(its[0])].append(its)
    rng = random.Random(seed)
    kept, held = [], []
    for name in sorted(by_class):
        groups = by_class[name]
        groups.sort(key=lambda its: order(its[0]) if order is not None else its[0])
        rng.shuffle(groups)
        size = sum(len(its) for its in groups)
        n_held = min(round(size * fraction), size - 1)
        taken = 0
        for its in groups:
            # First fit in shuffled order: a group too large for what is left stays kept.
            if taken + len(its) <= n_held:
                held += its
                taken += len(its)
            else:
                kept += its
    return kept, held
