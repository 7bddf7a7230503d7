"""NABirds: 555 North American bird categories with a class hierarchy, boxes and parts."""

from __future__ import annotations

from collections import defaultdict

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import locate, no_level, read_map, read_rows, to_float
from lookcloser.data.samples import DatasetSplits, Sample, register_source
from lookcloser.errors import DataError


@register_source("nabirds")
def nabirds(cfg: DataConfig) -> DatasetSplits:
    """`data.root` holding nabirds/ (as extracted from nabirds.tar.gz) or that folder.

    Classes are the categories images are labelled with (the 555 leaves of hierarchy.txt),
    in class-id order. Per-sample meta: `bbox` [x, y, w, h], `class_id` (the release's id),
    `hierarchy` (ancestor names, nearest first) and `parts` when parts/part_locs.txt exists.
    """
    no_level(cfg)
    base = locate(cfg, "image_class_labels.txt", ("nabirds",), "nabirds")
    images = read_map(base / "images.txt")
    labels = read_map(base / "image_class_labels.txt")
    names = read_map(base / "classes.txt")
    parent = read_map(base / "hierarchy.txt")
    split = read_map(base / "train_test_split.txt")
    boxes_path = base / "bounding_boxes.txt"
    boxes = (
        {r[0]: [to_float(v, boxes_path, "box") for v in r[1:5]] for r in read_rows(boxes_path, 5)}
        if boxes_path.is_file()
        else {}
    )
    parts_path = base / "parts" / "part_locs.txt"
    parts: dict[str, list[list[float]]] = defaultdict(list)
    if parts_path.is_file():
        for image_id, _part, x, y, visible, *_ in read_rows(parts_path, 5):
            parts[image_id].append([float(x), float(y), float(visible)])

    used = sorted({labels[i] for i in images if i in labels}, key=int)
    unknown = [c for c in used if c not in names]
    if unknown:
        raise DataError(f"{base / 'classes.txt'}: class ids {unknown[:5]} are not listed")
    classes = [names[c] for c in used]
    index = {c: i for i, c in enumerate(used)}
    ancestry = {c: _ancestors(c, parent, names) for c in used}

    train, test = [], []
    for image_id, rel in images.items():
        if image_id not in labels or image_id not in split:
            raise DataError(f"{base}: image {image_id} lacks a class label or a split entry")
        class_id = labels[image_id]
        meta: dict = {"class_id": int(class_id), "hierarchy": ancestry[class_id]}
        if image_id in boxes:
            meta["bbox"] = boxes[image_id]
        if image_id in parts:
            meta["parts"] = parts[image_id]
        sample = Sample(str(base / "images" / rel), index[class_id], meta)
        (train if split[image_id] == "1" else test).append(sample)
    annotations = ["hierarchy"] + (["bbox"] if boxes else []) + (["parts"] if parts else [])
    return DatasetSplits(classes, train, test, "nabirds", annotations)


def _ancestors(class_id: str, parent: dict[str, str], names: dict[str, str]) -> list[str]:
    chain, seen = [], {class_id}
    node = class_id
    while node in parent and parent[node] not in seen:
        node = parent[node]
        seen.add(node)
        chain.append(names.get(node, node))
    return chain
