"""Oxford Flowers-102: 102 flower categories; train+val for training, the official test set."""

from __future__ import annotations

import numpy as np

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import load_mat, locate, mat_field, no_level, train_split
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError


@register_source("flowers102")
def flowers102(cfg: DataConfig) -> DatasetSplits:
    """`data.root` with jpg/, imagelabels.mat and setid.mat.

    Training uses trnid + valid (`data.train_split=train` for trnid only, valid then being the
    validation split); testing uses tstid.
    The release names classes by number only, so class names are "001".."102".
    """
    no_level(cfg)
    base = locate(cfg, "setid.mat", ("flowers-102", "102flowers"), "flowers102")
    labels_path, setid_path = base / "imagelabels.mat", base / "setid.mat"
    labels = np.atleast_1d(mat_field(load_mat(labels_path), "labels", labels_path)).astype(int)
    setid = load_mat(setid_path)
    n_classes = int(labels.max())
    classes = [f"{i:03d}" for i in range(1, n_classes + 1)]

    def samples(key: str) -> list[Sample]:
        out = []
        for image_no in np.atleast_1d(mat_field(setid, key, setid_path)).astype(int):
            if not 1 <= image_no <= len(labels):
                raise DataError(f"{setid_path}: {key}: image {image_no} outside 1..{len(labels)}")
            path = base / "jpg" / f"image_{image_no:05d}.jpg"
            out.append(
                Sample(str(path), int(labels[image_no - 1]) - 1, {"image_id": int(image_no)})
            )
        return out

    if train_split(cfg, ("trainval", "train"), "trainval") == "trainval":
        train, val = samples("trnid") + samples("valid"), []
    else:
        train, val = samples("trnid"), samples("valid")
    return DatasetSplits(classes, train, samples("tstid"), "flowers102", [], val=val)
