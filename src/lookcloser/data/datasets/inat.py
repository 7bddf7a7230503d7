"""iNaturalist 2017 / 2018 / 2021 (and 2021 mini) from the competition JSON annotation files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import require_file, train_split
from lookcloser.data.download import check_not_incomplete
from lookcloser.data.samples import DatasetSplits, register_source, require_root
from lookcloser.data.table import SampleTable
from lookcloser.errors import DataError

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")
LEVELS = ("species", "supercategory", *RANKS)
_IMAGE_META = ("latitude", "longitude", "date", "location_uncertainty")
# version -> (train files by train_split, validation file); newest first.
_VERSIONS = {
    "2021": ({"train": "train.json", "train_mini": "train_mini.json"}, "val.json"),
    "2018": ({"train": "train2018.json"}, "val2018.json"),
    "2017": ({"train": "train2017.json"}, "val2017.json"),
}


@register_source("inat")
def inat(cfg: DataConfig) -> DatasetSplits:
    """`data.root` holding a competition release: its JSON files and image folders.

    The version is found from the JSON names (2021: train.json or train_mini.json + val.json;
    2018: train2018.json + val2018.json [+ categories.json]; 2017: train2017.json +
    val2017.json). The validation set is the test split (competition test labels are not
    public). `data.level` picks species (default), supercategory or a taxonomy rank (kingdom
    .. genus; 2018 needs categories.json, 2017 has supercategory only). `data.train_split=
    train_mini` selects the 2021 mini training set. Meta: `category_id`, `supercategory`,
    `taxonomy` (shared per class), and per image `latitude`, `longitude`, `date`,
    `location_uncertainty` where the release has them (2021).
    """
    level = cfg.level or "species"
    if level not in LEVELS:
        raise DataError(f"data.level: inat offers {', '.join(LEVELS)}; got {level!r}")
    root = require_root(cfg)
    check_not_incomplete(root)
    version, train_name, val_name = _detect(root, cfg)
    train_data = _load_json(root / train_name)
    val_data = _load_json(root / val_name)
    categories = _categories(train_data, root, version)

    if level == "species":
        keys = {cid: cat["name"] for cid, cat in categories.items()}
    else:
        missing = [cid for cid, cat in categories.items() if not cat.get(level)]
        if missing:
            raise DataError(
                f"data.level: the iNat {version} release has no {level!r} field for category "
                f"{missing[0]} (2017 offers species and supercategory; 2018 needs categories.json)"
            )
        keys = {cid: str(cat[level]) for cid, cat in categories.items()}
    if level == "species":
        order = sorted(categories)  # label = rank of the category id (= the id in 2021)
        classes = [keys[cid] for cid in order]
        label_of = {cid: i for i, cid in enumerate(order)}
    else:
        classes = sorted(set(keys.values()))
        index = {name: i for i, name in enumerate(classes)}
        label_of = {cid: index[name] for cid, name in keys.items()}
    shared = {cid: _class_meta(cat) for cid, cat in categories.items()}

    train = _samples(train_data, root, root / train_name, label_of, shared)
    test = _samples(val_data, root, root / val_name, label_of, shared)
    annotations = ["supercategory"]
    if any(cat.get(RANKS[0]) for cat in categories.values()):
        annotations.append("taxonomy")
    first = (train_data.get("images") or [{}])[0]
    if "latitude" in first:
        annotations.append("location")
    if "date" in first:
        annotations.append("date")
    return DatasetSplits(classes, train, test, f"inat{version}", annotations)


def _detect(root: Path, cfg: DataConfig) -> tuple[str, str, str]:
    for version, (train_files, val_file) in _VERSIONS.items():
        present = [s for s, f in train_files.items() if (root / f).is_file()]
        if not present or not (root / val_file).is_file():
            continue
        choice = train_split(cfg, tuple(train_files), present[0])
        if choice not in present:
            raise DataError(f"data.train_split={choice}: {root / train_files[choice]} is missing")
        return version, train_files[choice], val_file
    raise DataError(
        f"data.root: {root} holds no iNaturalist release: expected train.json or "
        "train_mini.json with val.json (2021), train2018.json with val2018.json, or "
        "train2017.json with val2017.json"
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with require_file(path).open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: missing the {key!r} list of the iNat annotation format")
    return data


def _categories(train: dict[str, Any], root: Path, version: str) -> dict[int, dict[str, Any]]:
    categories = {int(c["id"]): dict(c) for c in train["categories"]}
    extra = root / "categories.json"
    if version == "2018" and extra.is_file():
        # The 2018 train file names classes by number; categories.json has the taxonomy.
        with extra.open(encoding="utf-8") as f:
            full = {int(c["id"]): c for c in json.load(f)}
        for cid, cat in categories.items():
            cat.update(full.get(cid, {}))
    return categories


def _class_meta(cat: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"category_id": int(cat["id"])}
    if cat.get("supercategory") is not None:
        meta["supercategory"] = cat["supercategory"]
    taxonomy = {rank: cat[rank] for rank in RANKS if cat.get(rank)}
    if taxonomy:
        taxonomy["species"] = cat.get("name")
        if cat.get("common_name"):
            taxonomy["common_name"] = cat["common_name"]
        meta["taxonomy"] = taxonomy
    return meta


def _samples(
    data: dict[str, Any],
    root: Path,
    path: Path,
    label_of: dict[int, int],
    shared: dict[int, dict[str, Any]],
) -> SampleTable:
    """The images of one JSON file as a table (per-class meta shared, per-image meta columns)."""
    images = data["images"]
    # The category of each image id (the last annotation of an image wins), looked up in
    # sorted arrays rather than a dict of millions of Python ints.
    ann_images = np.fromiter((int(a["image_id"]) for a in data["annotations"]), dtype=np.int64)
    ann_cats = np.fromiter((int(a["category_id"]) for a in data["annotations"]), dtype=np.int64)
    order = np.argsort(ann_images, kind="stable")
    ann_images, ann_cats = ann_images[order], ann_cats[order]
    last = np.r_[ann_images[1:] != ann_images[:-1], True] if len(order) else order.astype(bool)
    ann_images, ann_cats = ann_images[last], ann_cats[last]
    image_ids = np.fromiter((int(image["id"]) for image in images), dtype=np.int64)
    at = np.minimum(np.searchsorted(ann_images, image_ids), max(len(ann_images) - 1, 0))
    annotated = (ann_images[at] == image_ids) if len(ann_images) else np.zeros(len(images), bool)
    if not annotated.all():
        i = int(np.argmin(annotated))
        raise DataError(
            f"{path}: image {image_ids[i]} ({images[i].get('file_name')}) has no annotation"
        )
    categories = ann_cats[at]
    known = np.array(sorted(label_of), dtype=np.int64)
    where = np.minimum(np.searchsorted(known, categories), max(len(known) - 1, 0))
    listed = known[where] == categories if len(known) else np.zeros(len(images), bool)
    if not listed.all():
        i = int(np.argmin(listed))
        raise DataError(
            f"{path}: image {image_ids[i]}: category {categories[i]} not in the category list"
        )
    labels = np.array([label_of[int(c)] for c in known], dtype=np.int64)[where]
    return SampleTable.build(
        (_join(root, image["file_name"]) for image in images),
        labels,
        shared=[shared[int(c)] for c in known],
        shared_code=where,
        columns={key: [image.get(key) for image in images] for key in _IMAGE_META},
    )


def _join(root: Path, name: str) -> str:
    """`str(root / name)`, without pathlib's cost for the plain names of millions of images."""
    plain = (
        os.sep == "/"
        and name
        and not name.startswith(("/", "./"))
        and not name.endswith(("/", "/."))
        and "//" not in name
        and "/./" not in name
        and name != "."
        and str(root) not in (".", "")
        and not str(root).endswith("/")
    )
    return f"{root}/{name}" if plain else str(root / name)
