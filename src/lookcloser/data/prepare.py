"""What a training run reads, decided once before any model is built.

`prepare_data` turns `data.*` into a `TrainingData`: the classes, the train / val / test
samples (or a shard index), the unlabelled stream and the skipped files. The validation split
is the source's own where it has one, else a seeded, stratified share of train
(`data.val_fraction`); the test split is only read for the final report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from lookcloser.config import DataConfig
from lookcloser.data.duplicates import SplitOverlap, file_keys, split_overlaps
from lookcloser.data.images import list_image_files, verify_samples
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
    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    unlabelled: list[Sample] = field(default_factory=list)
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


def prepare_data(cfg: DataConfig) -> TrainingData:
    """Load, check and split the data of a training run (DataError / ConfigError if unfit)."""
    keys = check_meta_keys(cfg.meta_keys)
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
        splits, skipped = verified(splits, cfg)
        splits, val_split = with_validation(splits, cfg)
        warn_overlaps(splits, cfg)
        data = TrainingData(
            splits.classes,
            splits.train,
            splits.val,
            splits.test,
            skipped=skipped,
            val_split=val_split,
        )
    if cfg.unlabelled:
        data.unlabelled, bad = unlabelled_samples(cfg, data.val + data.test)
        data.skipped += bad
    return data


def with_validation(splits: DatasetSplits, cfg: DataConfig) -> tuple[DatasetSplits, str]:
    """The splits with a val split (the source's own, else carved) and where it came from."""
    if splits.val:
        return splits, "official"
    if cfg.val_fraction == 0:
        return splits, "none"
    # A seed of its own, so the val carve does not mirror the test carve of the same seed.
    keys = file_keys(s.path for s in splits.train)  # copies of an image stay on one side
    train, val = stratified_split(
        splits.train,
        cfg.val_fraction,
        f"val-{cfg.split_seed}",
        label=lambda s: s.label,
        order=lambda s: s.path,
        key="data.val_fraction",
        group=lambda s: keys[s.path],
    )
    return splits.replace_samples(train, splits.test, val), "carved" if val else "none"


def warn_overlaps(splits: DatasetSplits, cfg: DataConfig) -> list[SplitOverlap]:
    """Warn about files that the given splits share (the user's split: not refused)."""
    overlaps = split_overlaps({"train": splits.train, "val": splits.val, "test": splits.test})
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


def check_meta_numbers(keys: list[str], samples: list[Sample]) -> None:
    """DataError naming the first sample whose declared metadata value is not a number
    (rather than calling the key absent, as `check_meta_present` would)."""
    for key in keys:
        for sample in samples:
            meta_value(sample.meta, key, sample.path)  # raises, naming sample, key and value


def verified(splits: DatasetSplits, cfg: DataConfig) -> tuple[DatasetSplits, list[str]]:
    """Splits without bad images (or a DataError listing them, per data.on_bad_image)."""
    if not cfg.verify_images:
        return splits, []
    kept, skipped = [], []
    for samples in (splits.train, splits.test, splits.val):
        good, bad = verify_samples(samples, cfg.on_bad_image, cfg.max_image_pixels)
        kept.append(good)
        skipped += [f"{r.path}: {r.problem}" for r in bad]
    return splits.replace_samples(*kept), skipped


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


def unlabelled_samples(cfg: DataConfig, held_out: list[Sample]) -> tuple[list[Sample], list[str]]:
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
    # The same file under another name, or the same bytes, counts as the same image.
    paths = [s.path for s in held_out] + [s.path for s in samples]
    keys = file_keys(paths, ["held"] * len(held_out) + ["unlabelled"] * len(samples))
    held = {keys[s.path] for s in held_out}
    shared = [s.path for s in samples if keys[s.path] in held]
    if shared:
        raise DataError(
            f"data.unlabelled: {len(shared)} image(s) are also in the val or test split "
            f"(e.g. {shared[0]}); the unlabelled stream must not see evaluation images"
        )
    if not cfg.verify_images:
        return samples, []
    good, bad = verify_samples(samples, cfg.on_bad_image, cfg.max_image_pixels)
    return good, [f"{r.path}: {r.problem}" for r in bad]
