"""iNaturalist 2017 / 2018 / 2021 (and 2021 mini) from the competition JSON annotation files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
from lookcloser.data.datasets._common import require_file, train_split
from lookcloser.data.download import check_not_incomplete
from lookcloser.data.samples import DatasetSplits, Sample, register_source, require_root
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
) -> list[Sample]:
    category_of: dict[int, int] = {}
    for ann in data["annotations"]:
        category_of[int(ann["image_id"])] = int(ann["category_id"])
    samples = []
    for image in data["images"]:
        image_id = int(image["id"])
        if image_id not in category_of:
            raise DataError(
                f"{path}: image {image_id} ({image.get('file_name')}) has no annotation"
            )
        cid = category_of[image_id]
        if cid not in label_of:
            raise DataError(f"{path}: image {image_id}: category {cid} not in the category list")
        meta = dict(shared[cid])
        for key in _IMAGE_META:
            if image.get(key) is not None:
                meta[key] = image[key]
        samples.append(Sample(str(root / image["file_name"]), label_of[cid], meta))
    return samples
