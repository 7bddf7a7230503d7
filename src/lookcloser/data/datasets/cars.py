"""Stanford Cars: 196 make/model/year classes, official train/test split, boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import corner_box, load_mat, locate, mat_field, no_level
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError

_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


@register_source("cars")
def cars(cfg: DataConfig) -> DatasetSplits:
    """`data.root` with the devkit layout: devkit/, cars_train/, cars_test/ and
    cars_test_annos_withlabels.mat (at the top or in devkit/). Meta: `bbox` [x, y, w, h]."""
    no_level(cfg)
    base = locate(cfg, "devkit/cars_meta.mat", ("stanford_cars",), "cars")
    meta_path = base / "devkit" / "cars_meta.mat"
    classes = [
        str(c) for c in np.atleast_1d(mat_field(load_mat(meta_path), "class_names", meta_path))
    ]
    test_annos = _test_annotations(base)
    train = _samples(base / "devkit" / "cars_train_annos.mat", base / "cars_train", len(classes))
    test = _samples(test_annos, base / "cars_test", len(classes))
    return DatasetSplits(classes, train, test, "cars", ["bbox"])


def _test_annotations(base: Path) -> Path:
    for path in (
        base / "cars_test_annos_withlabels.mat",
        base / "devkit" / "cars_test_annos_withlabels.mat",
    ):
        if path.is_file():
            return path
    raise DataError(
        f"{base}: cars_test_annos_withlabels.mat missing (the devkit's cars_test_annos.mat has "
        "no labels); put it next to devkit/"
    )


def _samples(path: Path, images: Path, n_classes: int) -> list[Sample]:
    annotations = np.atleast_1d(mat_field(load_mat(path), "annotations", path))
    names = annotations.dtype.names or ()
    missing = [f for f in _FIELDS if f not in names]
    if missing:
        raise DataError(f"{path}: annotations lack field(s) {', '.join(missing)}")
    samples = []
    for row in annotations:
        label = int(row["class"]) - 1  # the devkit numbers classes from 1
        if not 0 <= label < n_classes:
            raise DataError(f"{path}: {row['fname']}: class {label + 1} outside 1..{n_classes}")
        box = corner_box(row["bbox_x1"], row["bbox_y1"], row["bbox_x2"], row["bbox_y2"])
        samples.append(Sample(str(images / str(row["fname"])), label, {"bbox": box}))
    return samples
