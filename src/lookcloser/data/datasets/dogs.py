"""Stanford Dogs: 120 breeds from ImageNet, official train/test lists, boxes from XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import corner_box, load_mat, locate, mat_field, no_level
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError


@register_source("dogs")
def dogs(cfg: DataConfig) -> DatasetSplits:
    """`data.root` with Images/, Annotation/ and train_list.mat/test_list.mat (or lists/).

    Meta: `bbox` [x, y, w, h] of the first dog, `boxes` of all dogs in the image.
    """
    no_level(cfg)
    base = locate(cfg, "Images", ("StanfordDogs", "stanford_dogs"), "dogs")
    lists = base if (base / "train_list.mat").is_file() else base / "lists"
    train = _read_list(lists / "train_list.mat", base)
    test = _read_list(lists / "test_list.mat", base)
    folder_of: dict[int, str] = {}
    for rel, label, _ in train + test:
        folder_of.setdefault(label, rel.split("/", 1)[0])
    if sorted(folder_of) != list(range(1, len(folder_of) + 1)):
        raise DataError(f"{lists}: labels are not 1..{len(folder_of)}")
    # "n02085620-Chihuahua" -> "Chihuahua"
    classes = [folder_of[i].split("-", 1)[-1].replace("_", " ") for i in sorted(folder_of)]
    has_boxes = (base / "Annotation").is_dir()

    def samples(rows: list[tuple[str, int, str]]) -> list[Sample]:
        out = []
        for rel, label, annotation in rows:
            meta: dict = {}
            if has_boxes:
                boxes = _boxes(base / "Annotation" / annotation)
                if boxes:
                    meta = {"bbox": boxes[0], "boxes": boxes}
            out.append(Sample(str(base / "Images" / rel), label - 1, meta))
        return out

    return DatasetSplits(
        classes, samples(train), samples(test), "dogs", ["bbox"] if has_boxes else []
    )


def _read_list(path: Path, base: Path) -> list[tuple[str, int, str]]:
    data = load_mat(path)
    files = np.atleast_1d(mat_field(data, "file_list", path))
    labels = np.atleast_1d(mat_field(data, "labels", path))
    annotations = np.atleast_1d(mat_field(data, "annotation_list", path))
    if not len(files) == len(labels) == len(annotations):
        raise DataError(f"{path}: file_list, annotation_list and labels differ in length")
    return [(str(f), int(n), str(a)) for f, n, a in zip(files, labels, annotations, strict=True)]


def _boxes(path: Path) -> list[list[float]]:
    if not path.is_file():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: not valid annotation XML ({err})") from None
    boxes = []
    for box in root.iter("bndbox"):
        try:
            coords = [float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise DataError(f"{path}: bndbox needs numeric xmin, ymin, xmax, ymax") from None
        boxes.append(corner_box(*coords))
    return boxes
