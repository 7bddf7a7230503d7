"""What a training run reads, decided once before any model is built.

`prepare_data` turns `data.*` into a `TrainingData`: the classes, the train / val / test
samples (or a shard index), the unlabelled stream and the skipped files. The validation split
is the source's own where it has one, else a seeded, stratified share of train
(`data.val_fraction`); the test split is only read for the final report.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lookcloser.config import DataConfig
from lookcloser.data.duplicates import SplitOverlap, file_keys, split_overlaps
from lookcloser.data.images import list_image_files, verify_samples, verify_settings
from lookcloser.data.meta import check_meta_keys, check_meta_present, meta_value
from lookcloser.data.shards import ShardIndex, open_shards
from lookcloser.data.sources import (
    DatasetSplits,
    Sample,
    build_source,
    numeric_meta_keys,
    source_names,
    stratified_split,
)
from lookcloser.data.table import SampleTable, sample_labels, sample_paths, take
from lookcloser.data.verify_cache import VerifyCache, open_cache
from lookcloser.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARDS = "shards"  # data.source of streamed WebDataset shards (not a registered sample source)
UNLABELLED = -1  # the label of unlabelled samples (never read)


@dataclass
class TrainingData:
    """Classes, train / val / test samples (or a shard index), unlabelled samples, skipped files.

    `val_split` says where validation comes from: "official" (the source's or the shard
    index's own), "carved" (data.val_fraction of train) or "none".
    """

    classes: list[str]
    # Lists, or SampleTables (data/table.py) for sources that hold millions of samples.
    train: Sequence[Sample] = field(default_factory=list)
    val: Sequence[Sample] = field(default_factory=list)
    test: Sequence[Sample] = field(default_factory=list)
    unlabelled: Sequence[Sample] = field(default_factory=list)
    index: ShardIndex | None = None
    skipped: list[str] = field(default_factory=list)
    val_split: str = "none"

    def count(self, split: str) -> int:
        """Samples in a split ("train", "val", "test"); from the index for shards."""
        if self.index is None:
            return len(getattr(self, split))
        return (self.index.counts.get(split) or 0) if self.index.urls.get(split) else 0

    def summary(self) -> dict[str, int | str]:
        """Counts for model.json."""
        return {
            "train_images": self.count("train"),
            "val_images": self.count("val"),
            "test_images": self.count("test"),
            "val_split": self.val_split,
            "unlabelled_images": len(self.unlabelled),
            "skipped": len(self.skipped),
        }


def prepare_data(cfg: DataConfig, progress: bool | None = None) -> TrainingData:
    """Load, check and split the data of a training run (DataError / ConfigError if unfit).

    `progress`: a bar while images are verified (default: when stderr is a terminal).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    keys = check_meta_keys(cfg.meta_keys)
    known = None  # digests of files unchanged since they were verified
    if cfg.source == SHARDS:
        index = shard_index(cfg)
        check_classes(index.classes, cfg)
        check_meta_present(keys, index.meta_keys, f"the shards at {cfg.root}")
        has_val = bool(index.urls.get("val"))
        if not has_val:
            log.warning(
                "data.root=%s: the shard index has no val split, so training runs without "
                "validation (`data pack` writes one with data.val_fraction > 0)",
                cfg.root,
            )
        data = TrainingData(index.classes, index=index, val_split="official" if has_val else "none")
    else:
        splits = build_source(cfg)
        check_classes(splits.classes, cfg)
        check_meta_numbers(keys, splits.train)
        check_meta_present(keys, numeric_meta_keys(splits.train), f"data.source={cfg.source}")
        splits, skipped, cache = verify_splits(splits, cfg, progress)
        known = cache.digest if cache is not None else None
        splits, val_split = with_validation(splits, cfg, known)
        warn_overlaps(splits, cfg, known)
        data = TrainingData(
            splits.classes,
            splits.train,
            splits.val,
            splits.test,
            skipped=skipped,
            val_split=val_split,
        )
    if cfg.unlabelled:
        held_out = [*data.val, *data.test]
        data.unlabelled, bad = unlabelled_samples(cfg, held_out, progress, known)
        data.skipped += bad
    return data


def with_validation(
    splits: DatasetSplits, cfg: DataConfig, known: Callable[[str], str | None] | None = None
) -> tuple[DatasetSplits, str]:
    """The splits with a val split (the source's own, else carved) and where it came from.

    `known`: file digests already known (see `data.duplicates.file_keys`).
    """
    if splits.val:
        return splits, "official"
    if cfg.val_fraction == 0:
        return splits, "none"
    # Carved by position, so a SampleTable stays one (two row indices over its arrays).
    paths = list(sample_paths(splits.train))  # built once: file_keys keys its dict by them
    labels = sample_labels(splits.train)
    keys = file_keys(paths, known=known)  # copies of an image stay on one side
    # A seed of its own, so the val carve does not mirror the test carve of the same seed.
    train, val = stratified_split(
        range(len(paths)),
        cfg.val_fraction,
        f"val-{cfg.split_seed}",
        label=lambda i: int(labels[i]),
        order=lambda i: paths[i],
        key="data.val_fraction",
        group=lambda i: keys[paths[i]],
    )
    train_part, val_part = take(splits.train, train), take(splits.train, val)
    return splits.replace_samples(train_part, splits.test, val_part), "carved" if val else "none"


def warn_overlaps(
    splits: DatasetSplits, cfg: DataConfig, known: Callable[[str], str | None] | None = None
) -> list[SplitOverlap]:
    """Warn about files that the given splits share (the user's split: not refused)."""
    overlaps = split_overlaps(
        {"train": splits.train, "val": splits.val, "test": splits.test}, known=known
    )
    for overlap in overlaps:
        log.warning(
            "data.root=%s: %s; the %s figures count images the model trained on or was "
            "chosen with (`lookcloser data check %s` lists them)",
            cfg.root,
            overlap.describe(),
            overlap.second,
            cfg.root,
        )
    return overlaps


def check_meta_numbers(keys: list[str], samples: Sequence[Sample]) -> None:
    """DataError naming the first sample whose declared metadata value is not a number
    (rather than calling the key absent, as `check_meta_present` would)."""
    for key in keys:
        for sample in samples:
            meta_value(sample.meta, key, sample.path)  # raises, naming sample, key and value


def verified(
    splits: DatasetSplits, cfg: DataConfig, progress: bool = False
) -> tuple[DatasetSplits, list[str]]:
    """Splits without bad images (or a DataError listing them, per data.on_bad_image)."""
    return verify_splits(splits, cfg, progress)[:2]


def verify_splits(
    splits: DatasetSplits, cfg: DataConfig, progress: bool = False
) -> tuple[DatasetSplits, list[str], VerifyCache | None]:
    """`verified`, plus the verification cache it used (None when images are not verified
    or the cache cannot be used): images unchanged since a previous run are not decoded."""
    if not cfg.verify_images:
        return splits, [], None
    parts = {"train": splits.train, "test": splits.test, "val": splits.val}
    cache = open_cache(sample_folders(*parts.values()), verify_settings(cfg.max_image_pixels))
    kept, skipped = [], []
    try:
        for name, samples in parts.items():
            good, bad = verify_samples(
                samples,
                cfg.on_bad_image,
                cfg.max_image_pixels,
                cache=cache,
                progress=progress,
                what=f"{name} images",
            )
            kept.append(good)
            skipped += [f"{r.path}: {r.problem}" for r in bad]
    finally:  # kept even when a bad image stops the run: the next start reads only what changed
        if cache is not None:
            cache.save()
    return splits.replace_samples(*kept), skipped, cache


def sample_folders(*parts: Sequence[Sample]) -> set[str]:
    """The folders the samples' files are in."""
    folders: set[str] = set()
    for samples in parts:
        if isinstance(samples, SampleTable):
            folders.update(samples.folders)
        else:
            folders.update(os.path.dirname(s.path) for s in samples)
    return folders


def check_classes(classes: list[str], cfg: DataConfig) -> None:
    """A classifier needs at least two classes (refused before anything is built)."""
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(
            f"data.root={cfg.root}: a classifier needs at least 2 classes, found {found} "
            f"(data.source={cfg.source})"
        )


def shard_index(cfg: DataConfig) -> ShardIndex:
    """The shard index of `data.root`, checked for training (uniform sampler, known counts)."""
    index = open_shards(cfg.root)
    if cfg.sampler != "uniform":
        raise ConfigError(
            f"data.sampler={cfg.sampler}: weighted sampling needs an in-memory sample list; "
            "streamed shards support data.sampler=uniform only"
        )
    if index.counts.get("train") is None:
        raise ConfigError(
            f"data.root={cfg.root}: the pattern names shards the index does not count; "
            "training needs the number of samples (use the shard folder or its dataset.json)"
        )
    return index


def unlabelled_samples(
    cfg: DataConfig,
    held_out: Sequence[Sample],
    progress: bool = False,
    known: Callable[[str], str | None] | None = None,
) -> tuple[Sequence[Sample], list[str]]:
    """The images of `data.unlabelled` (labels set to UNLABELLED) and the skipped bad ones.

    `data.unlabelled` is a folder, read recursively with sub-folders not taken as classes,
    or `source:root`, the training images of that source. Images of the val or test split
    (`held_out`) are refused: the unlabelled stream must not see what evaluation measures.
    """
    spec = cfg.unlabelled or ""
    name, sep, root = spec.partition(":")
    if sep and name == SHARDS:
        raise ConfigError(
            "data.unlabelled: shards are not supported; give a folder or `source:root`"
        )
    if sep and name in source_names():
        train = build_source(replace(cfg, source=name, root=root)).train
        if isinstance(train, SampleTable):
            samples: Sequence[Sample] = train.with_label(UNLABELLED)
        else:
            samples = [Sample(s.path, UNLABELLED, s.meta) for s in train]
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data.unlabelled: {spec} is not a folder (or `source:root` with a source of "
                f"{', '.join(source_names())})"
            )
        samples = [Sample(str(p), UNLABELLED) for p in list_image_files(folder)]
    if not samples:
        raise DataError(f"data.unlabelled: no images found in {spec}")
    cache = None
    if cfg.verify_images:
        cache = open_cache(sample_folders(samples), verify_settings(cfg.max_image_pixels))

    def digest(path: str) -> str | None:  # unchanged files need not be read again
        own = cache.digest(path) if cache is not None else None
        return own or (known(path) if known is not None else None)

    # The same file under another name, or the same bytes, counts as the same image.
    paths = [s.path for s in held_out] + list(sample_paths(samples))
    sides = ["held"] * len(held_out) + ["unlabelled"] * len(samples)
    keys = file_keys(paths, sides, known=digest)
    held = {keys[s.path] for s in held_out}
    shared = [p for p in sample_paths(samples) if keys[p] in held]
    if shared:
        raise DataError(
            f"data.unlabelled: {len(shared)} image(s) are also in the val or test split "
            f"(e.g. {shared[0]}); the unlabelled stream must not see evaluation images"
        )
    if not cfg.verify_images:
        return samples, []
    try:
        good, bad = verify_samples(
            samples,
            cfg.on_bad_image,
            cfg.max_image_pixels,
            cache=cache,
            progress=progress,
            what="unlabelled images",
        )
    finally:
        if cache is not None:
            cache.save()
    return good, [f"{r.path}: {r.problem}" for r in bad]
