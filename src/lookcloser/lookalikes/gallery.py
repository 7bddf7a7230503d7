"""The reference gallery: embeddings of labelled images, bound to the model that made them.

A gallery folder (`MODEL_DIR/gallery` by default) holds `gallery.safetensors` (`embeddings`
N x D float32 unit rows, sorted by class; `labels` N int64, indices into the model's classes)
and `gallery.json` (written last: a folder without it is no gallery): the model's weights
SHA-256 and class list, the paths of the references relative to the data root they were
read from (never the images), the data root, and the open-set calibration on the validation
split. A gallery is untrusted input like a model directory: JSON and safetensors only, the
header and every size and shape checked before use, and a path in it is only ever joined to
a data root the user gives, after checking that it stays inside (relative, no `..`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lookcloser.embeddings import EmbeddingStream, embedding_info
from lookcloser.errors import ConfigError, DataError, ModelDirError
from lookcloser.fileio import atomic_path, atomic_write_text
from lookcloser.lookalikes.openset import (
    DEFAULT_KEEP,
    calibrate,
    check_calibration,
    classifier_rows,
    nearest_similarity,
    open_set_scores,
)

FORMAT = "lookcloser.gallery"
FORMAT_VERSION = 1
GALLERY_DIR = "gallery"
GALLERY_JSON = "gallery.json"
GALLERY_TENSORS = "gallery.safetensors"
# 1M references of 60-character paths are about 70 MB of JSON.
MAX_GALLERY_JSON = 256 << 20
MAX_PATH_CHARS = 4096


# ---- paths ---------------------------------------------------------------------------------------
def relative_path(path: str, root: Path) -> str:
    """`path` relative to `root` (lexically, links not followed), as a POSIX path; DataError
    when it lies outside."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        raise DataError(
            f"{path}: outside the data root {root}; a gallery records paths inside it"
        ) from None


def check_relative(where: str, text: Any) -> str:
    """ModelDirError unless `text` is a relative POSIX path that stays inside its root."""
    if not isinstance(text, str) or not text or len(text) > MAX_PATH_CHARS or "\0" in text:
        raise ModelDirError(f"{where}: expected a relative path, got {_short(text)}")
    pure = PurePosixPath(text)
    if pure.is_absolute() or "\\" in text or ".." in pure.parts or text.startswith("~"):
        raise ModelDirError(
            f"{where}: {_short(text)} leaves the data root; a gallery's paths must be "
            "relative and stay inside it"
        )
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- the gallery ----------------------------------------------------------------------------------
@dataclass
class Neighbour:
    """One reference near a query."""

    row: int
    path: str  # relative to the data root
    class_name: str
    similarity: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "path": self.path,
            "class": self.class_name,
            "similarity": round(self.similarity, 6),
        }


@dataclass
class Gallery:
    """A loaded, checked gallery (see the module docstring)."""

    folder: Path
    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    data_root: str
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        counts = np.bincount(self.labels, minlength=len(self.classes))
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The open-set calibration (thresholds per score on the val split), or None."""
        return self.record.get("open_set")

    def class_rows(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def neighbours(self, query: np.ndarray, class_index: int, k: int) -> list[Neighbour]:
        """The k references of class `class_index` most similar to one query embedding."""
        rows = self.class_rows(class_index)
        block = self.embeddings[rows]
        if not len(block) or k < 1:
            return []
        sims = block @ np.asarray(query, dtype=np.float32)
        top = np.argsort(-sims, kind="stable")[:k]
        return [
            Neighbour(
                int(rows.start + i),
                self.paths[rows.start + i],
                self.classes[class_index],
                float(sims[i]),
            )
            for i in top
        ]

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, row) of the nearest reference of each query (B x D)."""
        return nearest_similarity(queries, self.embeddings)

    def file(self, row: int, root: str | Path | None = None) -> Path:
        """The image file of reference `row` under `root` (default: the recorded data root);
        its relative path was checked to stay inside the root."""
        if not 0 <= row < len(self.paths):
            raise ConfigError(f"gallery row {row}: expected 0..{len(self.paths) - 1}")
        base = Path(root) if root is not None else Path(self.data_root)
        return base / check_relative(f"{self.folder / GALLERY_JSON}: paths[{row}]", self.paths[row])


def find_gallery(model_dir: str | Path) -> Path | None:
    """MODEL_DIR/gallery when it holds a gallery, else None."""
    folder = Path(model_dir) / GALLERY_DIR
    return folder if (folder / GALLERY_JSON).is_file() else None


def load_gallery(folder: str | Path, predictor) -> Gallery:
    """The gallery in `folder`, checked against the model it must have been built for."""
    from lookcloser.modeldir import check_format, file_sha256, read_json_file, weights_header

    folder = Path(folder)
    meta = folder / GALLERY_JSON
    if not meta.is_file():
        raise ModelDirError(
            f"{folder}: no {GALLERY_JSON}; build one with `lookcloser gallery build MODEL_DIR DATA`"
        )
    if meta.stat().st_size > MAX_GALLERY_JSON:
        raise ModelDirError(f"{meta}: larger than {MAX_GALLERY_JSON >> 20} MiB")
    # read_json_file bounds at the model.json limit; a gallery's may be bigger
    record = _read_json(meta) if meta.stat().st_size > (16 << 20) else read_json_file(meta)
    check_format(meta, record, FORMAT, FORMAT_VERSION)
    model = record.get("model")
    if not isinstance(model, dict):
        raise ModelDirError(f"{meta}: missing field 'model'")
    sha = predictor.info.get("weights", {}).get("sha256")
    if model.get("weights_sha256") != sha:
        raise ModelDirError(
            f"{meta}: built for another model (weights SHA-256 "
            f"{str(model.get('weights_sha256'))[:12]}..., this model's {str(sha)[:12]}...); "
            "rebuild it with `lookcloser gallery build MODEL_DIR DATA`"
        )
    if model.get("classes") != list(predictor.classes):
        raise ModelDirError(
            f"{meta}: built for another class list ({_short(model.get('classes'))}); rebuild it "
            "with `lookcloser gallery build MODEL_DIR DATA`"
        )
    paths = record.get("paths")
    if not isinstance(paths, list):
        raise ModelDirError(f"{meta}: paths: expected a list of relative paths")
    for i, text in enumerate(paths):
        check_relative(f"{meta}: paths[{i}]", text)
    root = record.get("data_root")
    if not isinstance(root, str) or not os.path.isabs(root):
        raise ModelDirError(f"{meta}: data_root: expected an absolute folder, got {_short(root)}")
    tensors = record.get("tensors")
    if not isinstance(tensors, dict):
        raise ModelDirError(f"{meta}: missing field 'tensors'")
    from lookcloser.modeldir import check_file_name, check_inside

    check_file_name(meta, "tensors.file", tensors.get("file"))
    file = folder / tensors["file"]
    if not file.is_file():
        raise ModelDirError(f"{file}: missing")
    check_inside(meta, "tensors.file", file)
    if file.stat().st_size != tensors.get("bytes"):
        raise ModelDirError(f"{file}: size does not match {GALLERY_JSON} (corrupt or replaced)")
    header = weights_header(file)
    n, dim = len(paths), embedding_info(predictor)["dim"]
    expected = {"embeddings": ("F32", (n, dim)), "labels": ("I64", (n,))}
    found = {k: (str(d).upper(), tuple(s)) for k, (d, s) in header.items()}
    if found != expected:
        raise ModelDirError(
            f"{file}: tensors {found}, expected {expected} ({n} references of this model's "
            f"{dim}-wide embedding)"
        )
    if file_sha256(file) != tensors.get("sha256"):
        raise ModelDirError(f"{file}: SHA-256 does not match {GALLERY_JSON} (corrupt or replaced)")
    from safetensors.numpy import load_file

    arrays = load_file(str(file))
    embeddings, labels = arrays["embeddings"], arrays["labels"]
    if n and (labels.min() < 0 or labels.max() >= len(predictor.classes)):
        raise ModelDirError(f"{file}: labels outside 0..{len(predictor.classes) - 1}")
    if n and np.any(np.diff(labels) < 0):
        raise ModelDirError(f"{file}: labels are not sorted by class")
    if not np.isfinite(embeddings).all():
        raise ModelDirError(f"{file}: embeddings that are not finite numbers")
    record["open_set"] = check_calibration(record.get("open_set"), str(meta))
    return Gallery(folder, embeddings, labels, paths, list(predictor.classes), root, record)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise ModelDirError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ModelDirError(f"{file}: expected a JSON object")
    return record


# ---- building ---------------------------------------------------------------------------------------
@dataclass
class GalleryBuilt:
    """What `build_gallery` wrote and measured."""

    folder: Path
    references: int
    val_images: int
    classes_without_references: list[str]
    skipped: list[tuple[str, str]]
    seconds: float
    bytes: int
    open_set: dict[str, Any] | None


def data_splits(predictor, data: str | Path, on_bad_image: str = "error"):
    """(train samples, val samples, data root, class names) of DATA read as the model's data
    was: an ImageFolder tree (train/ with val/ or the model's val carve) or a CSV file."""
    from lookcloser.config import Config
    from lookcloser.data.prepare import verified, with_validation
    from lookcloser.data.sources import build_source

    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: does not exist")
    cfg = Config.from_dict(predictor.info["config"])
    source = "csv" if data.is_file() else "imagefolder"
    cfg.apply_overrides(
        [f"data.source={source}", f"data.root={data}", f"data.on_bad_image={on_bad_image}"]
    )
    splits = build_source(cfg.data)
    unknown = [c for c in splits.classes if c not in predictor.classes]
    if unknown:
        raise DataError(
            f"{data}: class {unknown[0]!r} is not one of the model's classes "
            f"({len(unknown)} such); a gallery holds references of the model's classes only"
        )
    splits = splits.replace_samples(splits.train, [], splits.val)
    splits, _ = verified(splits, cfg.data)
    splits, _ = with_validation(splits, cfg.data)
    root = Path(os.path.abspath(data if data.is_dir() else data.parent))
    return splits.train, splits.val, root, splits.classes


def build_gallery(
    predictor,
    data: str | Path,
    out: str | Path,
    batch_size: int = 32,
    num_workers: int = 0,
    on_bad_image: str = "error",
    keep: float = DEFAULT_KEEP,
) -> GalleryBuilt:
    """Embed DATA's training images (less the val split, as the model's training split them)
    into a gallery in `out`, and calibrate the open-set thresholds on the val split."""
    import time

    start = time.perf_counter()
    train, val, root, data_classes = data_splits(predictor, data, on_bad_image)
    if not train:
        raise DataError(f"{data}: no training images to build a gallery from")
    to_model = [predictor.classes.index(c) for c in data_classes]
    info = embedding_info(predictor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / GALLERY_JSON).unlink(missing_ok=True)  # the old record goes first: never mismatched

    files = [s.path for s in train]
    labels_by_file = np.array([to_model[s.label] for s in train], dtype=np.int64)
    paths_by_file = [relative_path(f, root) for f in files]
    stream = EmbeddingStream(predictor, files, batch_size, num_workers, on_bad_image)
    work = out / f".{GALLERY_TENSORS}.rows.npy"
    try:
        array = np.lib.format.open_memmap(
            work, mode="w+", dtype=np.float32, shape=(len(files), info["dim"])
        )
        kept = _fill_rows(array, 0, stream)
        labels = labels_by_file[kept]
        order = np.argsort(labels, kind="stable")
        tensors = out / GALLERY_TENSORS
        _write_safetensors(tensors, array, order, labels[order])
        calibration = _calibrate(predictor, val, array[: len(kept)], labels, info, batch_size, keep)
        del array
    finally:
        work.unlink(missing_ok=True)
    counts = np.bincount(labels, minlength=len(predictor.classes))
    paths = [paths_by_file[i] for i in np.asarray(kept, dtype=np.int64)[order]]
    _write_record(out, predictor, root, counts, paths, calibration, [p for p, _ in stream.skipped])
    return GalleryBuilt(
        out,
        len(kept),
        len(val),
        [c for c, n in zip(predictor.classes, counts, strict=True) if n == 0],
        list(stream.skipped),
        time.perf_counter() - start,
        _size(out),
        calibration,
    )


# Scores that can only rise when classes are added (maxima and logsumexp over more rows, the
# trained rows unchanged), so a threshold calibrated before enrollment still keeps at least
# its share of the known classes' images after it. The top softmax probability can fall.
NEVER_LOWER_WITH_MORE_CLASSES = ("energy", "max_cosine", "nearest_prototype", "nearest_reference")


def extend_gallery(
    gallery: Gallery,
    predictor,
    added: dict[str, list[str]],
    out: str | Path,
    batch_size: int = 32,
    on_bad_image: str = "error",
) -> GalleryBuilt:
    """The gallery of an enrolled model in `out`: `gallery`'s references (the base model's
    embeddings: enrollment leaves the backbone as it is), and the enrollment images of the
    new classes (`added`: {class: files}) as their references. Paths become relative to the
    common folder of the base data root and the new images. The open-set calibration is
    carried over for the scores enrollment never lowers (`NEVER_LOWER_WITH_MORE_CLASSES`):
    at least the calibrated share of the base val images still passes."""
    import time

    start = time.perf_counter()
    index = {name: i for i, name in enumerate(predictor.classes)}
    missing = [c for c in (*gallery.classes, *added) if c not in index]
    if missing:
        raise ConfigError(
            f"extend_gallery: the model has no class {missing[0]!r}; expected the enrolled model"
        )
    files = [f for name in added for f in added[name]]
    labels_by_file = np.array([index[name] for name in added for _ in added[name]], np.int64)
    root = Path(
        os.path.commonpath(
            [gallery.data_root, *(os.path.dirname(os.path.abspath(f)) for f in files)]
        )
    )
    base_paths = [relative_path(os.path.join(gallery.data_root, p), root) for p in gallery.paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / GALLERY_JSON).unlink(missing_ok=True)
    n, dim = len(gallery), gallery.embeddings.shape[1]
    stream = EmbeddingStream(predictor, files, batch_size, 0, on_bad_image)
    work = out / f".{GALLERY_TENSORS}.rows.npy"
    try:
        array = np.lib.format.open_memmap(work, "w+", np.float32, (n + len(files), dim))
        for first in range(0, n, 4096):
            last = min(first + 4096, n)
            array[first:last] = gallery.embeddings[first:last]
        kept = _fill_rows(array, n, stream)
        to_new = np.array([index[c] for c in gallery.classes], dtype=np.int64)
        labels = np.concatenate([to_new[gallery.labels], labels_by_file[kept]])
        order = np.argsort(labels, kind="stable")
        _write_safetensors(out / GALLERY_TENSORS, array, order, labels[order])
        del array
    finally:
        work.unlink(missing_ok=True)
    paths = [*base_paths, *(relative_path(files[i], root) for i in kept)]
    calibration = _carried_calibration(gallery.calibration)
    counts = np.bincount(labels, minlength=len(predictor.classes))
    _write_record(
        out,
        predictor,
        root,
        counts,
        [paths[i] for i in order],
        calibration,
        [p for p, _ in stream.skipped],
        carried_over={
            "from_weights_sha256": gallery.record.get("model", {}).get("weights_sha256"),
            "from_data_root": gallery.data_root,
            "base_references": n,
            "enrolled_references": len(kept),
        },
    )
    return GalleryBuilt(
        out,
        len(paths),
        int(calibration["val_images"]) if calibration else 0,
        [c for c, k in zip(predictor.classes, counts, strict=True) if k == 0],
        list(stream.skipped),
        time.perf_counter() - start,
        _size(out),
        calibration,
    )


def _fill_rows(array: np.ndarray, start: int, stream: EmbeddingStream) -> list[int]:
    """Write the stream's embeddings into `array` from row `start` on, in the order read;
    the positions (in the stream's files) of the images read."""
    kept: list[int] = []
    for batch in stream:
        first = start + len(kept)
        array[first : first + len(batch.positions)] = batch.embeddings
        kept += batch.positions
    array.flush()
    return kept


def _carried_calibration(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """The base gallery's calibration less the scores enrollment can lower (None when its
    chosen score can)."""
    if calibration is None or calibration["score"] not in NEVER_LOWER_WITH_MORE_CLASSES:
        return None
    thresholds = {
        k: v for k, v in calibration["thresholds"].items() if k in NEVER_LOWER_WITH_MORE_CLASSES
    }
    return {**calibration, "thresholds": thresholds, "carried_over": True}


def _write_record(
    out: Path,
    predictor,
    root: Path | str,
    counts: np.ndarray,
    paths: list[str],
    calibration: dict[str, Any] | None,
    skipped: list[str],
    **extra: Any,
) -> None:
    """gallery.json for the tensors in `out` (written last: it makes the folder a gallery)."""
    from lookcloser.modeldir import file_sha256

    tensors = out / GALLERY_TENSORS
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "weights_sha256": predictor.info.get("weights", {}).get("sha256"),
            "classes": list(predictor.classes),
            "method": predictor.info.get("method"),
            "embedding": embedding_info(predictor),
        },
        "data_root": str(root),
        "references": len(paths),
        "per_class": {c: int(n) for c, n in zip(predictor.classes, counts, strict=True)},
        "tensors": {
            "file": GALLERY_TENSORS,
            "sha256": file_sha256(tensors),
            "bytes": tensors.stat().st_size,
        },
        "open_set": calibration,
        "skipped": skipped,
        **extra,
        "paths": paths,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / GALLERY_JSON, json.dumps(record) + "\n")


def _size(out: Path) -> int:
    return (out / GALLERY_TENSORS).stat().st_size + (out / GALLERY_JSON).stat().st_size


def _write_safetensors(
    path: Path, rows: np.ndarray, order: np.ndarray, labels: np.ndarray, chunk: int = 4096
) -> None:
    """A safetensors file of `rows[order]` (embeddings) and `labels`, written chunk by chunk
    (memory flat in the number of rows)."""
    n, dim = len(order), rows.shape[1]
    size = n * dim * 4
    header = {
        "embeddings": {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, size]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [size, size + 8 * n]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for start in range(0, n, chunk):
            f.write(np.ascontiguousarray(rows[order[start : start + chunk]]).tobytes())
        f.write(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        f.flush()


def class_means(rows: np.ndarray, labels: np.ndarray, classes: int, chunk: int = 4096):
    """The unit mean embedding of each class with rows (C' x D, classes without rows left
    out), accumulated chunk by chunk."""
    sums = np.zeros((classes, rows.shape[1]), dtype=np.float64)
    for start in range(0, len(rows), chunk):
        np.add.at(sums, labels[start : start + chunk], np.asarray(rows[start : start + chunk]))
    norms = np.linalg.norm(sums, axis=1)
    present = norms > 0
    return (sums[present] / norms[present, None]).astype(np.float32)


def _calibrate(predictor, val, references, labels, info, batch_size, keep):
    """The open-set thresholds on the val split, or None without one (`references`: the
    gallery's rows in any order, `labels` theirs)."""
    if not val:
        return None
    stream = EmbeddingStream(predictor, [s.path for s in val], batch_size, 0, "skip")
    logits, embeddings = [], []
    for batch in stream:
        logits.append(batch.logits)
        embeddings.append(batch.embeddings)
    if not logits:
        return None
    scores = open_set_scores(
        np.concatenate(logits),
        np.concatenate(embeddings),
        classifier_rows(predictor.method, info["classifier"]),
        class_means(references, labels, len(predictor.classes)),
        references,
    )
    return calibrate(scores, keep)


# ---- answers with look-alikes and an open-set decision -----------------------------------------------
class Lookalikes:
    """A gallery with what an answer needs from it: neighbours and the open-set decision."""

    def __init__(self, gallery: Gallery, predictor):
        self.gallery = gallery
        info = embedding_info(predictor)
        self.class_rows = classifier_rows(predictor.method, info["classifier"])
        self.prototypes = class_means(gallery.embeddings, gallery.labels, len(gallery.classes))

    @property
    def calibrated(self) -> bool:
        return self.gallery.calibration is not None

    def open_set(self, logits: np.ndarray, embeddings: np.ndarray) -> list[dict[str, Any]]:
        """Per image: {"unknown", "score", "value", "threshold"} (ConfigError uncalibrated)."""
        calibration = self.gallery.calibration
        if calibration is None:
            raise ConfigError(
                f"{self.gallery.folder}: the gallery has no open-set calibration (its data had "
                "no validation split: rebuild it from data with val/ or data.val_fraction > 0)"
            )
        name = calibration["score"]
        threshold = float(calibration["thresholds"][name])
        scores = open_set_scores(
            logits,
            embeddings,
            self.class_rows,
            self.prototypes,
            self.gallery.embeddings if name == "nearest_reference" else None,
        )[name]
        return [
            {
                "unknown": bool(v < threshold),
                "score": name,
                "value": round(float(v), 6),
                "threshold": round(threshold, 6),
            }
            for v in scores
        ]

    def neighbours(
        self, embedding: np.ndarray, class_indices: Sequence[int], k: int
    ) -> list[dict[str, Any]]:
        """[{"class", "neighbours": [...]}] of the given classes (the predicted one and the
        runner-up), k references each."""
        return [
            {
                "class": self.gallery.classes[c],
                "neighbours": [n.as_dict() for n in self.gallery.neighbours(embedding, c, k)],
            }
            for c in class_indices
        ]
