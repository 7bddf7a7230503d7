"""A model's outputs over a labelled split, kept small: one pass over the stream of batches
records, per image, its label, its TOP_K most probable classes with their probabilities, the
true class's probability and its path. That is what `compare` (predictions, per-class
accuracy, disagreements) and `ensemble fit` (the mixture's top-1 and exact log-loss) need,
in about 90 bytes an image plus its path: never the images x classes probabilities (at iNat's
100k validation images x 10k classes those are 4 GB a run).

The record is saved as an .npz (no pickles) and read back as untrusted input: every array's
dtype and shape is checked from its header before it is read, and a file that fails any
check is ignored (with a warning) so that the caller rebuilds it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lookcloser.arrays import GrowingArray
from lookcloser.errors import DataError
from lookcloser.fileio import atomic_open

log = logging.getLogger(__name__)

# Classes kept per image (fewer when the model has fewer). 10 covers top-1 and top-5 with
# room for an ensemble's candidates: 4 + 10 x (4 + 4) + 4 = 88 bytes an image.
TOP_K = 10
# The .npz layout; a file of another version is ignored (and rebuilt by its caller).
RECORD_FORMAT = 1
_ARRAYS = {
    # name: dtype, and the shape as a function of (images, k, path bytes)
    "format": ("<i8", lambda n, k, b: (1,)),
    "num_classes": ("<i8", lambda n, k, b: (1,)),
    "labels": ("<i4", lambda n, k, b: (n,)),
    "top_classes": ("<i4", lambda n, k, b: (n, k)),
    "top_probs": ("<f4", lambda n, k, b: (n, k)),
    "true_probs": ("<f4", lambda n, k, b: (n,)),
    # The paths as one UTF-8 blob and each path's end offset (none at all: a stream without
    # paths): a fixed-width unicode array would take 4 bytes a character of the longest path.
    "path_bytes": ("|u1", lambda n, k, b: (b,)),
    "path_ends": ("<i8", lambda n, k, b: None),  # (n,) or (0,)
    "metrics": ("|u1", lambda n, k, b: None),  # JSON of the summary metrics, any length
}


@dataclass(eq=False)
class RunRecord:
    """Per image: label, top-K classes (most probable first; equal probabilities: the lowest
    class first, as argmax) and their probabilities, the true class's probability, the path;
    `metrics`: the summary figures of the same pass (JSON-able), filled by the caller."""

    labels: np.ndarray  # int32, N
    top_classes: np.ndarray  # int32, N x K
    top_probs: np.ndarray  # float32, N x K
    true_probs: np.ndarray  # float32, N
    paths: list[str]  # N, or empty when the stream had none
    num_classes: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        k = self.top_classes.shape[1] if self.top_classes.ndim == 2 else -1
        if not (
            self.labels.shape == (n,)
            and self.top_classes.shape == (n, k)
            and self.top_probs.shape == (n, k)
            and self.true_probs.shape == (n,)
            and 1 <= k <= self.num_classes
            and len(self.paths) in (0, n)
        ):
            raise DataError(
                f"run record: inconsistent shapes (labels {self.labels.shape}, top classes "
                f"{self.top_classes.shape}, top probabilities {self.top_probs.shape}, true "
                f"probabilities {self.true_probs.shape}, {len(self.paths)} paths, "
                f"{self.num_classes} classes)"
            )

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def from_stream(
        cls,
        stream: Iterable[Any],
        num_classes: int,
        *,
        top_k: int = TOP_K,
        observe: Callable[[Tensor, Tensor], None] | None = None,
    ) -> RunRecord:
        """One pass over batches with `.logits` (B x C logits or log-probabilities), `.labels`
        and `.paths` (a predictor.OutputBatch); `observe(logits, labels)` sees each batch too
        (e.g. `StreamingMetrics.update`), so the metrics come from the same pass."""
        k = min(top_k, num_classes)
        # Growing arrays, not per-batch lists: see lookcloser.arrays (heap fragmentation).
        labels, true = GrowingArray(np.int32), GrowingArray(np.float32)
        classes, probs = GrowingArray(np.int32, (k,)), GrowingArray(np.float32, (k,))
        paths: list[str] = []
        for batch in stream:
            if observe is not None:
                observe(batch.logits, batch.labels)
            b_classes, b_probs, b_true = top_of(batch.logits, batch.labels, k)
            labels.extend(batch.labels)
            classes.extend(b_classes)
            probs.extend(b_probs)
            true.extend(b_true)
            paths += [str(p) for p in batch.paths]
        if len(paths) != len(labels):
            paths = []  # a stream without paths (or with some batches only): none kept
        return cls(labels.take(), classes.take(), probs.take(), true.take(), paths, num_classes)

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        labels: Tensor,
        paths: Sequence[str] = (),
        top_k: int = TOP_K,
    ) -> RunRecord:
        """The record of whole N x C outputs (one batch)."""
        batch = _Batch(logits, labels, list(paths))
        return cls.from_stream([batch], logits.shape[1], top_k=top_k)

    # ---- derived once ---------------------------------------------------------------------------
    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def k(self) -> int:
        """Classes kept per image."""
        return self.top_classes.shape[1]

    @cached_property
    def predictions(self) -> np.ndarray:
        """The top-1 class of each image (int64, N)."""
        return self.top_classes[:, 0].astype(np.int64)

    @cached_property
    def correct(self) -> np.ndarray:
        """Whether each image's top-1 class is its label (bool, N)."""
        return self.predictions == self.labels

    @cached_property
    def per_class_totals(self) -> np.ndarray:
        """Images of each class (int64, C)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    @cached_property
    def per_class_hits(self) -> np.ndarray:
        """Images of each class predicted right (int64, C)."""
        right = self.labels[self.correct]
        return np.bincount(right, minlength=self.num_classes).astype(np.int64)

    @cached_property
    def per_class_accuracy(self) -> np.ndarray:
        """Accuracy of each class (float64, C; NaN for a class without images)."""
        totals = self.per_class_totals
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, self.per_class_hits / np.maximum(totals, 1), np.nan)

    def log_loss(self) -> float:
        """Mean negative log of the true class's probability (exact: it is stored)."""
        return float(-np.log(np.clip(self.true_probs.astype(np.float64), 1e-12, None)).mean())

    # ---- reshaping --------------------------------------------------------------------------------
    def take(self, order: np.ndarray) -> RunRecord:
        """The images at `order` (indices), in that order."""
        order = np.asarray(order, dtype=np.int64)
        return RunRecord(
            self.labels[order],
            self.top_classes[order],
            self.top_probs[order],
            self.true_probs[order],
            [self.paths[i] for i in order] if self.paths else [],
            self.num_classes,
            dict(self.metrics),
        )

    def renumber(self, new_index: np.ndarray) -> RunRecord:
        """The record with class i renamed new_index[i] (a permutation of the classes); equal
        probabilities reordered lowest new class first, as argmax over reordered outputs."""
        new_index = np.asarray(new_index, dtype=np.int32)
        if not np.array_equal(np.sort(new_index), np.arange(self.num_classes)):
            raise DataError(f"run record: not a permutation of {self.num_classes} classes")
        classes, probs = _order_rows(new_index[self.top_classes], self.top_probs)
        return RunRecord(
            new_index[self.labels],
            classes,
            probs,
            self.true_probs,
            list(self.paths),
            self.num_classes,
            dict(self.metrics),
        )

    # ---- the file -------------------------------------------------------------------------------
    def save(self, file: str | Path) -> Path:
        """Write the record as a compressed .npz (atomically; no pickles)."""
        encoded = [p.encode("utf-8", "surrogateescape") for p in self.paths]
        ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
        arrays = {
            "format": np.array([RECORD_FORMAT], dtype=np.int64),
            "num_classes": np.array([self.num_classes], dtype=np.int64),
            "labels": self.labels.astype(np.int32),
            "top_classes": self.top_classes.astype(np.int32),
            "top_probs": self.top_probs.astype(np.float32),
            "true_probs": self.true_probs.astype(np.float32),
            "path_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            "path_ends": ends,
            "metrics": np.frombuffer(json.dumps(self.metrics).encode(), dtype=np.uint8),
        }
        # A file object: np.savez given a name would add ".npz" to the temporary one.
        with atomic_open(file, "wb") as f:
            np.savez_compressed(f, **arrays)
        return Path(file)

    @classmethod
    def load(cls, file: str | Path, max_images: int | None = None) -> RunRecord | None:
        """The record saved in `file`, or None (with a warning) if it is missing, of another
        version or fails a check: the caller rebuilds it. `max_images` bounds what is read."""
        file = Path(file)
        if not file.is_file():
            return None
        try:
            return cls._read(file, max_images)
        except Exception as err:  # noqa: BLE001 (untrusted bytes: any failure means rebuild)
            log.warning("%s: ignored, rebuilt (%s)", file, str(err)[:200] or type(err).__name__)
            return None

    @classmethod
    def _read(cls, file: Path, max_images: int | None) -> RunRecord:
        with zipfile.ZipFile(file) as archive:
            names = sorted(archive.namelist())
            if names != sorted(f"{name}.npy" for name in _ARRAYS):
                raise DataError(f"unexpected members {names[:12]}")
            headers = {name: _header(archive, f"{name}.npy") for name in _ARRAYS}
        for name, (dtype, _) in _ARRAYS.items():
            if headers[name][1] != np.dtype(dtype):
                raise DataError(f"{name}: dtype {headers[name][1]}, expected {np.dtype(dtype)}")
        labels, top = headers["labels"][0], headers["top_classes"][0]
        n = labels[0] if len(labels) == 1 else -1
        k = top[1] if len(top) == 2 else -1
        blob = headers["path_bytes"][0]
        b = blob[0] if len(blob) == 1 else -1
        if n < 0 or k < 1 or b < 0:
            raise DataError(f"shapes {labels}, {top}, {blob}")
        if max_images is not None and n > max_images:
            raise DataError(f"{n} images, more than the {max_images} of the split")
        for name, (_, shape) in _ARRAYS.items():
            want = shape(n, k, b)
            if want is not None and headers[name][0] != want:
                raise DataError(f"{name}: shape {headers[name][0]}, expected {want}")
        if headers["path_ends"][0] not in ((n,), (0,)) or len(headers["metrics"][0]) != 1:
            raise DataError(f"path_ends {headers['path_ends'][0]}, metrics {headers['metrics'][0]}")
        if headers["metrics"][0][0] > 1 << 20:
            raise DataError("metrics: over 1 MB")
        with np.load(file, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in _ARRAYS}
        if int(arrays["format"][0]) != RECORD_FORMAT:
            raise DataError(f"format {int(arrays['format'][0])}, expected {RECORD_FORMAT}")
        classes = int(arrays["num_classes"][0])
        if not 1 <= k <= classes:
            raise DataError(f"{k} classes kept of {classes}")
        for name in ("labels", "top_classes"):
            values = arrays[name]
            if values.size and (values.min() < 0 or values.max() >= classes):
                raise DataError(f"{name}: a class index outside 0 to {classes - 1}")
        for name in ("top_probs", "true_probs"):
            values = arrays[name]
            if values.size and not (np.isfinite(values).all() and values.min() >= 0):
                raise DataError(f"{name}: not probabilities")
            if values.size and values.max() > 1.0001:
                raise DataError(f"{name}: not probabilities")
        ends, data = arrays["path_ends"], arrays["path_bytes"].tobytes()
        if len(ends) and (np.any(np.diff(ends) < 0) or ends[0] < 0 or ends[-1] != len(data)):
            raise DataError("path_ends: not the offsets of the path bytes")
        if not len(ends) and data:
            raise DataError("path bytes without offsets")
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        paths = [
            data[s:e].decode("utf-8", "surrogateescape")
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        metrics = json.loads(arrays["metrics"].tobytes().decode("utf-8"))
        if not isinstance(metrics, dict):
            raise DataError("metrics: not a mapping")
        return cls(
            arrays["labels"],
            arrays["top_classes"],
            arrays["top_probs"],
            arrays["true_probs"],
            paths,
            classes,
            metrics,
        )


@dataclass
class _Batch:
    logits: Tensor
    labels: Tensor
    paths: list[str]


def top_of(logits: Tensor, labels: Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B x k classes, B x k probabilities, B true-class probabilities) of one batch of logits
    or log-probabilities; equal probabilities in argmax's order (the lowest class first)."""
    num_classes = logits.shape[1] if logits.ndim == 2 else -1
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise DataError(
            f"model outputs of shape {tuple(logits.shape)} with labels of shape "
            f"{tuple(labels.shape)} (expected batch x classes and one label each)"
        )
    labels = labels.to(logits.device).long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"a label outside the {num_classes} classes (expected 0 to {num_classes - 1})"
        )
    with torch.no_grad():
        probs = logits.detach().float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        # topk picks any of the classes tied at the k-th probability: where some were left
        # out, those rows take the lowest tied classes (as a stable sort would), so the record
        # is the same whatever the kernel.
        kth = values[:, -1:]
        straddle = ((probs == kth).sum(dim=1) > (values == kth).sum(dim=1)).nonzero()[:, 0]
        if len(straddle):
            p, t = probs[straddle], kth[straddle]
            above, tied = p > t, p == t
            room = k - above.sum(dim=1, keepdim=True)
            keep = above | (tied & (tied.cumsum(dim=1) <= room))
            chosen = keep.nonzero()[:, 1].view(len(straddle), k)
            indices[straddle], values[straddle] = chosen, p.gather(1, chosen)
        # Most probable first, equal probabilities lowest class first (argmax's choice).
        by_class = indices.argsort(dim=1)
        indices, values = indices.gather(1, by_class), values.gather(1, by_class)
        order = values.argsort(dim=1, descending=True, stable=True)
        indices, values = indices.gather(1, order), values.gather(1, order)
        true = probs.gather(1, labels[:, None]).squeeze(1)
    return (
        indices.cpu().numpy().astype(np.int32),
        values.cpu().numpy().astype(np.float32),
        true.cpu().numpy().astype(np.float32),
    )


def _order_rows(classes: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row most probable first, equal probabilities lowest class first."""
    by_class = np.argsort(classes, axis=1, kind="stable")
    classes, probs = (
        np.take_along_axis(classes, by_class, 1),
        np.take_along_axis(probs, by_class, 1),
    )
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.take_along_axis(classes, order, 1), np.take_along_axis(probs, order, 1)


def _header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one .npy member, read from its header alone."""
    with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DataError(f"{name}: .npy version {version}")
    return tuple(int(s) for s in shape), dtype
