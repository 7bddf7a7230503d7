"""The open-set answer: "none of these" for images of no class the model knows.

Every score is higher for images that look like a known class:

- `max_softmax`: the top class probability;
- `energy`: logsumexp of the logits (Liu et al. 2020, at temperature 1);
- `max_cosine`: the largest cosine between the embedding and the decision classifier's class
  rows (weights, cosine weights or prototypes);
- `nearest_prototype`: the largest cosine between the embedding and the class means of the
  gallery's references (the prototype of each class);
- `nearest_reference`: the largest cosine to any single reference of the gallery.

The threshold is calibrated on the validation split (never the test split): every val image
is of a known class, so the threshold is the score that keeps a share `keep` of them (0.95:
the 5th percentile); an image scoring below it is `unknown`. Which score separates best was
measured (docs/benchmarks.md, look-alikes): `DEFAULT_SCORE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lookcloser.errors import ConfigError
from lookcloser.models.heads import CosineHead, PrototypeHead

SCORES = ("max_softmax", "energy", "max_cosine", "nearest_prototype", "nearest_reference")
GALLERY_SCORES = ("nearest_prototype", "nearest_reference")
# Chosen by measurement: docs/benchmarks.md, section look-alikes (open set).
DEFAULT_SCORE = "nearest_reference"
DEFAULT_KEEP = 0.95
# Rows of the gallery multiplied at once (memory: chunk x queries floats).
CHUNK = 65536


def classifier_rows(method: nn.Module, name: str) -> np.ndarray:
    """The unit class rows (weights, cosine weights or prototypes) of the classifier layer
    `name` of `method` (from `embed.embedding_info`)."""
    module = method.get_submodule(name)
    if isinstance(module, PrototypeHead):
        rows = module.prototypes
    elif isinstance(module, CosineHead | nn.Linear):
        rows = module.weight
    else:  # pragma: no cover - embed only names these
        raise ConfigError(f"{name}: not a class classifier layer")
    return F.normalize(rows.detach().float().cpu(), dim=1).numpy()


def nearest_similarity(queries: np.ndarray, references: np.ndarray, chunk: int = CHUNK):
    """(largest cosine, row) of each query (B x D unit rows) among `references` (N x D unit
    rows), by matrix products over chunks of the references; -inf / -1 without references."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    where = np.full(len(queries), -1, dtype=np.int64)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    for start in range(0, len(references), chunk):
        block = torch.from_numpy(np.ascontiguousarray(references[start : start + chunk]))
        sims = q @ block.T
        values, rows = sims.max(dim=1)
        better = values.numpy() > best
        best[better] = values.numpy()[better]
        where[better] = rows.numpy()[better] + start
    return best, where


def open_set_scores(
    logits: np.ndarray,
    embeddings: np.ndarray,
    class_rows: np.ndarray | None = None,
    prototypes: np.ndarray | None = None,
    references: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every score that the given inputs allow, per image (B)."""
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    out = {
        "max_softmax": t.softmax(dim=1).max(dim=1).values.numpy(),
        "energy": torch.logsumexp(t, dim=1).numpy(),
    }
    if class_rows is not None:
        out["max_cosine"] = nearest_similarity(embeddings, class_rows)[0]
    if prototypes is not None:
        out["nearest_prototype"] = nearest_similarity(embeddings, prototypes)[0]
    if references is not None:
        out["nearest_reference"] = nearest_similarity(embeddings, references)[0]
    return out


def calibrate(val_scores: Mapping[str, np.ndarray], keep: float = DEFAULT_KEEP) -> dict[str, Any]:
    """Thresholds keeping a share `keep` of the validation images for each score."""
    if not 0 < keep <= 1:
        raise ConfigError(f"keep: expected a share in (0, 1], got {keep}")
    images = len(next(iter(val_scores.values()))) if val_scores else 0
    thresholds = {
        name: float(np.quantile(values, 1 - keep, method="lower"))
        for name, values in val_scores.items()
    }
    return {
        "score": DEFAULT_SCORE if DEFAULT_SCORE in thresholds else "max_softmax",
        "keep": keep,
        "val_images": images,
        "thresholds": thresholds,
    }


def check_calibration(record: Any, where: str) -> dict[str, Any] | None:
    """A checked calibration record of gallery.json (None: not calibrated)."""
    from lookcloser.errors import ModelDirError

    if record is None:
        return None
    if not isinstance(record, dict):
        raise ModelDirError(f"{where}: open_set: expected a mapping or null")
    thresholds = record.get("thresholds")
    if not isinstance(thresholds, dict) or not all(
        k in SCORES and isinstance(v, int | float) and np.isfinite(v) for k, v in thresholds.items()
    ):
        raise ModelDirError(f"{where}: open_set.thresholds: expected score name -> number")
    if record.get("score") not in thresholds:
        raise ModelDirError(f"{where}: open_set.score: expected one of {', '.join(thresholds)}")
    keep = record.get("keep")
    if not isinstance(keep, int | float) or not 0 < keep <= 1:
        raise ModelDirError(f"{where}: open_set.keep: expected a share in (0, 1]")
    return record


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known (higher scores) from unknown images: the
    chance that a random known image scores above a random unknown one (ties count half)."""
    scores = np.concatenate([known, unknown])
    ranks = _average_ranks(scores)
    n_known, n_unknown = len(known), len(unknown)
    if not n_known or not n_unknown:
        return float("nan")
    return float((ranks[:n_known].sum() - n_known * (n_known + 1) / 2) / (n_known * n_unknown))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
