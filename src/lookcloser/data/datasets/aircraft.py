"""FGVC-Aircraft 2013b: 100 variants / 70 families / 30 manufacturers, trainval/test, boxes."""

from __future__ import annotations

from pathlib import Path

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import (
    corner_box,
    locate,
    read_rows,
    require_file,
    to_float,
    train_split,
)
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError

LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


@register_source("aircraft")
def aircraft(cfg: DataConfig) -> DatasetSplits:
    """`data.root` holding fgvc-aircraft-2013b/ (or its data/ folder), labels at `data.level`.

    `data.level` is variant (default), family or manufacturer; training uses the official
    trainval list (`data.train_split=train` for the train list only, the val list then being
    the validation split). Meta: `bbox` [x, y, w, h].
    """
    level = cfg.level or "variant"
    if level not in LEVELS:
        raise DataError(f"data.level: aircraft offers {', '.join(LEVELS)}; got {level!r}")
    base = locate(cfg, "images_variant_test.txt", ("data", "fgvc-aircraft-2013b/data"), "aircraft")
    # One name per line; names contain spaces and slashes ("F/A-18").
    classes = [
        line.strip()
        for line in require_file(base / LEVELS[level]).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    boxes = _boxes(base / "images_box.txt")
    chosen = train_split(cfg, ("trainval", "train"), "trainval")
    train = _split(base, level, chosen, classes, boxes)
    test = _split(base, level, "test", classes, boxes)
    # The official val list is a validation split only when it is not part of training.
    has_val = chosen == "train" and (base / f"images_{level}_val.txt").is_file()
    val = _split(base, level, "val", classes, boxes) if has_val else []
    annotations = ["bbox"] if boxes else []
    return DatasetSplits(classes, train, test, "aircraft", annotations, val=val)


def _boxes(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    return {
        row[0]: corner_box(*(to_float(v, path, f"image {row[0]} box") for v in row[1:5]))
        for row in read_rows(path, 5)
    }


def _split(
    base: Path, level: str, split: str, classes: list[str], boxes: dict[str, list[float]]
) -> list[Sample]:
    path = base / f"images_{level}_{split}.txt"
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for image_id, name in read_rows(path, 2, max_split=1):
        name = name.strip()
        if name not in index:
            raise DataError(f"{path}: image {image_id}: class {name!r} not in {LEVELS[level]}")
        meta = {"bbox": boxes[image_id]} if image_id in boxes else {}
        samples.append(Sample(str(base / "images" / f"{image_id}.jpg"), index[name], meta))
    return samples
