"""CUB-200-2011: 200 bird species, official train/test split, boxes, 15 parts, 312 attributes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import locate, no_level, read_map, read_rows, to_float
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError


@register_source("cub200")
def cub200(cfg: DataConfig) -> DatasetSplits:
    """`data.root` holding CUB_200_2011/ (as extracted from CUB_200_2011.tgz) or that folder.

    Per-sample meta: `bbox` [x, y, w, h]; `parts` 15 [x, y, visible] rows in the order of
    parts/parts.txt; `attributes` the ids (1-312, attributes.txt) marked present.
    """
    no_level(cfg)
    base = locate(cfg, "images.txt", ("CUB_200_2011",), "cub200")
    images = read_map(base / "images.txt")
    labels = read_map(base / "image_class_labels.txt")
    class_rows = read_rows(base / "classes.txt", 2, max_split=1)
    class_ids = [row[0] for row in class_rows]
    classes = [_readable(row[1].strip()) for row in class_rows]
    index = {cid: i for i, cid in enumerate(class_ids)}
    split = read_map(base / "train_test_split.txt")

    annotations: list[str] = []
    boxes = _boxes(base / "bounding_boxes.txt")
    if boxes:
        annotations.append("bbox")
    parts = _parts(base / "parts" / "part_locs.txt")
    if parts:
        annotations.append("parts")
    attributes = _attributes(base / "attributes" / "image_attribute_labels.txt")
    if attributes:
        annotations.append("attributes")

    train, test = [], []
    for image_id, rel in images.items():
        if image_id not in labels or image_id not in split:
            raise DataError(f"{base}: image id {image_id} lacks a class label or a split entry")
        if labels[image_id] not in index:
            raise DataError(f"{base / 'image_class_labels.txt'}: unknown class {labels[image_id]}")
        meta: dict = {"image_id": int(image_id)}
        if image_id in boxes:
            meta["bbox"] = boxes[image_id]
        if image_id in parts:
            meta["parts"] = parts[image_id]
        if attributes:
            meta["attributes"] = attributes.get(image_id, [])
        sample = Sample(str(base / "images" / rel), index[labels[image_id]], meta)
        (train if split[image_id] == "1" else test).append(sample)
    return DatasetSplits(classes, train, test, "cub200", annotations)


def _readable(name: str) -> str:
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    return name.split(".", 1)[-1].replace("_", " ")


def _boxes(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    return {
        row[0]: [to_float(v, path, f"image {row[0]} box") for v in row[1:5]]
        for row in read_rows(path, 5)
    }


def _parts(path: Path) -> dict[str, list[list[float]]]:
    if not path.is_file():
        return {}
    parts: dict[str, list[list[float]]] = defaultdict(list)
    for image_id, _part_id, x, y, visible, *_ in read_rows(path, 5):
        # Rows come ordered by image then part id, so list order is part order.
        parts[image_id].append(
            [to_float(x, path, "x"), to_float(y, path, "y"), to_float(visible, path, "visible")]
        )
    return dict(parts)


def _attributes(path: Path) -> dict[str, list[int]]:
    if not path.is_file():
        return {}
    present: dict[str, list[int]] = defaultdict(list)
    # A few lines of the release carry extra columns; only the first three matter here.
    for image_id, attribute_id, is_present, *_ in read_rows(path, 3):
        if is_present == "1":
            present[image_id].append(int(attribute_id))
    return dict(present)
