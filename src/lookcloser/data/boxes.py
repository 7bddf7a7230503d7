"""Object boxes for crop fusion (`model.crop_fusion`): where they come from and the crops.

A box is `[x, y, w, h]` in pixels of the original image as it is read (full resolution, EXIF
orientation applied, before any resize or crop): the form CUB, NABirds, Stanford Dogs and Cars carry as `bbox` in a
sample's meta, and the form of a box file. Three sources (`data.boxes`, `data.test_boxes`):

* `attention`: no box from the data; the model picks its own crop (models/crops.py).
* `dataset`: each sample's `bbox` annotation.
* a `.json` box file, as any detector can write it: an object mapping image path -> box,
  `{"train/0001.jpg": [12, 30, 200, 150], ...}`. Relative paths are taken from the file's
  folder (as `--meta` files and `data.source=csv` do; a file written in the data root uses
  paths relative to the root), absolute paths as they are.

Boxes from the data are cut from the original image here, at its full resolution, and the
crop goes through the same transform as the image (its own augmentation draw in training).
An image without a box gets the whole image as its crop; the count is logged with examples
and returned to the caller (`Predictions.without_box`), never silent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lookcloser.data.meta import same_path
from lookcloser.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ATTENTION, DATASET = "attention", "dataset"
Box = tuple[float, float, float, float]  # x, y, w, h in original-image pixels
# Detectors round box edges; a box may overhang the image by this much (it is clipped).
EDGE_TOLERANCE = 1.0


def box_source_kind(source: str, key: str = "data.boxes") -> str:
    """'attention', 'dataset' or 'file' for a box source; ConfigError for anything else."""
    if source in (ATTENTION, DATASET):
        return source
    if str(source).lower().endswith(".json"):
        return "file"
    raise ConfigError(
        f"{key}={source}: expected attention, dataset or a .json box file "
        "(image path -> [x, y, w, h] in pixels)"
    )


def check_box_config(cfg: Any) -> None:
    """ConfigError for box settings that cannot work: boxes without crop fusion, boxes from
    the data with streamed shards, or with mixup / cutmix (they would mix the images but not
    their crops)."""
    fusion = cfg.model.crop_fusion
    for key in ("boxes", "test_boxes"):
        source = getattr(cfg.data, key)
        kind = box_source_kind(source, f"data.{key}")
        if kind == ATTENTION:
            continue
        if fusion == "none":
            raise ConfigError(
                f"data.{key}={source}: boxes are used by crop fusion only; set "
                "model.crop_fusion=concat|add, or leave data.boxes / data.test_boxes at attention"
            )
        if cfg.data.source == "shards":
            raise ConfigError(
                f"data.{key}={source}: streamed shards carry no boxes; use "
                f"data.{key}=attention with data.source=shards"
            )
    if fusion != "none" and cfg.data.boxes != ATTENTION and (cfg.data.mixup or cfg.data.cutmix):
        raise ConfigError(
            f"data.mixup / data.cutmix with data.boxes={cfg.data.boxes}: the images would be "
            "mixed but not their crops; use data.boxes=attention (crops of the mixed images)"
        )


def parse_box(value: Any, where: str) -> Box:
    """A box `[x, y, w, h]` (4 finite numbers, w and h > 0, x and y >= 0) or a DataError."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise DataError(
            f"{where}: expected a box [x, y, w, h] (4 numbers in pixels), got {value!r}"
        )
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: expected a box [x, y, w, h] of numbers, got {value!r}")
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(f"{where}: box {list(value)} has a non-finite value")
    if w <= 0 or h <= 0:
        raise DataError(
            f"{where}: box {list(value)} has width or height <= 0 (expected [x, y, w, h])"
        )
    if x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE:
        raise DataError(f"{where}: box {list(value)} starts left of or above the image (x, y < 0)")
    return x, y, w, h


def read_box_file(path: str | Path) -> dict[str, Box]:
    """Boxes of a JSON box file, keyed by `same_path(image)` (relative paths from the file's
    folder); a DataError naming the file and the entry for anything malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"box file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"box file {path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(
            f"box file {path}: expected an object mapping image path -> [x, y, w, h], "
            f"got {type(raw).__name__}"
        )
    boxes = {}
    for image, value in raw.items():
        box = parse_box(value, f"box file {path}: entry {image!r}")
        full = Path(image) if Path(image).is_absolute() else path.parent / image
        boxes[same_path(full)] = box
    return boxes


def sample_boxes(
    paths: Sequence[str],
    source: str,
    metas: Sequence[Mapping[str, Any]] | None = None,
    key: str = "data.boxes",
    split: str = "",
) -> list[Box | None] | None:
    """Each image's box from `source` (None for an image without one), or None for attention
    (no boxes from the data). `metas`: the samples' meta, for `dataset`. Images without a
    box are counted and logged."""
    kind = box_source_kind(source, key)
    if kind == ATTENTION:
        return None
    if kind == DATASET:
        metas = metas if metas is not None else [{}] * len(paths)
        boxes = [
            parse_box(m["bbox"], f"{p}: bbox annotation") if m.get("bbox") is not None else None
            for p, m in zip(paths, metas, strict=True)
        ]
    else:
        by_path = read_box_file(source)
        boxes = [by_path.get(same_path(p)) for p in paths]
        if paths and by_path and all(b is None for b in boxes):
            raise DataError(
                f"box file {source}: no entry matches the images (e.g. {next(iter(by_path))!r} "
                f"vs {paths[0]!r}); relative paths in a box file are taken from its folder"
            )
    report_missing(paths, boxes, f"{key}={source}" + (f" ({split})" if split else ""))
    return boxes


def report_missing(paths: Sequence[str], boxes: Sequence[Box | None], where: str) -> list[str]:
    """Log how many images have no box (their crop is the whole image); their paths."""
    missing = [p for p, b in zip(paths, boxes, strict=True) if b is None]
    if missing:
        log.warning(
            "%s: %d of %d images have no box; their crop is the whole image (e.g. %s)",
            where,
            len(missing),
            len(paths),
            ", ".join(missing[:3]),
        )
    return missing


def crop_to_box(image: Image.Image, box: Box | None, where: str) -> Image.Image:
    """The box's region of an image (the whole image for None), edges rounded to pixels; a
    DataError for a box outside the image (beyond EDGE_TOLERANCE)."""
    if box is None:
        return image
    x, y, w, h = box
    width, height = image.size
    if (
        x + w > width + EDGE_TOLERANCE
        or y + h > height + EDGE_TOLERANCE
        or x >= width
        or y >= height
    ):
        raise DataError(
            f"{where}: box [x, y, w, h] = {[x, y, w, h]} lies outside the {width} x {height} "
            "image (boxes are in pixels of the original image)"
        )
    left, top = max(0, round(x)), max(0, round(y))
    right, bottom = min(width, round(x + w)), min(height, round(y + h))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
