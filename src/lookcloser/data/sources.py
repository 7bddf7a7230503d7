"""Data sources behind one registry: each turns a DataConfig into labelled samples.

A source knows file layouts and annotation formats, nothing about tensors or training.
Adding a dataset is one function decorated with `@register_source("name")`
(data/samples.py); this module loads every built-in one (local files, the benchmark
datasets, the synthetic set) and builds the source a config names.
"""

from __future__ import annotations

# Importing the source modules registers them.
from lookcloser.config import DataConfig
from lookcloser.data import datasets, local_sources, synthetic  # noqa: F401
from lookcloser.data.local_sources import imagefolder  # noqa: F401  (re-exported)
from lookcloser.data.samples import (  # noqa: F401  (re-exported: the types of every source)
    IMAGE_EXTENSIONS,
    SOURCES,
    DatasetSplits,
    Sample,
    is_image_file,
    numeric_meta_keys,
    register_source,
    require_root,
    stratified_split,
)
from lookcloser.errors import DataError


def build_source(cfg: DataConfig) -> DatasetSplits:
    """Load the samples of the source that `cfg.source` names."""
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
    return sorted(SOURCES)
