"""Out-of-class scores, the threshold chosen on the labelled val split, and filter quality.

Every score is "higher = more like the labelled classes":

* `max_softmax`: the largest class probability (Hendrycks & Gimpel 2017);
* `energy`: logsumexp of the logits, the negative free energy (Liu et al. 2020), which keeps
  the logits' scale that the softmax throws away;
* `prototype`: the cosine similarity of the image's embedding to the nearest class prototype
  (the mean L2-normalized embedding of the class's labelled images).

The threshold is chosen on the val split, never on test: every val image is in-class, so
the threshold that keeps a share `val_keep` of them (the (1 - val_keep) quantile of their
scores) keeps about that share of the in-class unlabelled images too, whatever the
out-of-class share, which is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lookcloser.errors import ConfigError

SCORES = ("max_softmax", "energy", "prototype")


def ood_scores(
    name: str,
    logits: Tensor,
    embeddings: Tensor | None = None,
    prototypes: Tensor | None = None,
) -> Tensor:
    """N scores of the named kind (higher = more in-class) from logits or embeddings."""
    logits = logits.float()
    if name == "max_softmax":
        return logits.softmax(dim=1).amax(dim=1)
    if name == "energy":
        return torch.logsumexp(logits, dim=1)
    if name == "prototype":
        if embeddings is None or prototypes is None:
            raise ValueError("the prototype score needs embeddings and class prototypes")
        return prototype_similarity(embeddings, prototypes).amax(dim=1)
    raise ConfigError(f"semi.ood_score: expected one of none, {', '.join(SCORES)}, got {name!r}")


def prototype_similarity(embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """N x C cosine similarities; classes whose prototype is all zeros (never seen) get -1."""
    return _similarity(embeddings, F.normalize(prototypes.float(), dim=1), _seen(prototypes))


def _seen(prototypes: Tensor) -> Tensor:
    return prototypes.abs().sum(dim=1) > 0


def _similarity(embeddings: Tensor, unit_prototypes: Tensor, seen: Tensor) -> Tensor:
    sims = F.normalize(embeddings.float(), dim=1) @ unit_prototypes.T
    return sims.masked_fill_(~seen, -1.0)


class BatchScorer:
    """Every score kind, the predicted class and its confidence for one batch at a time, so a
    pass over N images keeps N scalars per kind, never its N x C logits.

    The prototypes are normalized once here rather than per batch; the values are those of
    `ood_scores` on the same logits and embeddings (tests/unit/test_semi_streaming.py).
    """

    def __init__(self, prototypes: Tensor):
        self.unit = F.normalize(prototypes.float(), dim=1)
        self.seen = _seen(prototypes)

    def to(self, device: str | torch.device) -> BatchScorer:
        """The scorer with its prototypes on `device` (where the batches' logits are)."""
        self.unit, self.seen = self.unit.to(device), self.seen.to(device)
        return self

    def __call__(self, logits: Tensor, embeddings: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({kind: B scores} for every kind in SCORES, B predicted classes); the confidence
        of the predicted class is the `max_softmax` score."""
        logits = logits.float()
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        scores = {
            "max_softmax": confidence,
            "energy": torch.logsumexp(logits, dim=1),
            "prototype": _similarity(embeddings, self.unit, self.seen).amax(dim=1),
        }
        return {kind: scores[kind] for kind in SCORES}, predicted


def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C x D class means of L2-normalized embeddings (zeros for a class without images)."""
    sums = PrototypeSums(num_classes)
    sums.add(embeddings, labels)
    return sums.prototypes(embeddings.shape[1])


class PrototypeSums:
    """Running per-class sums of L2-normalized embeddings and counts: class prototypes from
    batches without holding the N x D embeddings (C x D in memory)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: Tensor | None = None  # C x D once the first batch gives D
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    def add(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add a batch (B x D embeddings, B class indices); summed on the CPU in image order."""
        embeddings, labels = embeddings.float().cpu(), labels.long().cpu()
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, embeddings.shape[1])
        self.sums.index_add_(0, labels, F.normalize(embeddings, dim=1))
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def prototypes(self, dim: int) -> Tensor:
        """C x D class means (zeros for a class without images; D = `dim` if none was added)."""
        sums = self.sums if self.sums is not None else torch.zeros(self.num_classes, dim)
        return sums / self.counts.clamp_min(1)[:, None]


def val_threshold(val_scores: Tensor, keep: float) -> float:
    """The score threshold that keeps a share `keep` of the val images (scores >= it)."""
    if val_scores.numel() == 0:
        raise ConfigError("semi: the OOD threshold is chosen on the val split, which is empty")
    ordered = val_scores.float().sort(descending=True).values
    # The k-th best val score, k = ceil(keep * n): exactly k images (ties aside) pass.
    # (Rounded first: 0.9 * 10 is 9.000000000000002 in floats.)
    k = max(1, min(len(ordered), math.ceil(round(keep * len(ordered), 9))))
    return float(ordered[k - 1])


@dataclass
class FilterQuality:
    """How well a kept / rejected decision separates in-class from out-of-class images."""

    kept: int
    total: int
    in_class: int
    kept_in_class: int

    @property
    def precision(self) -> float:
        """Share of kept images that are in-class (1.0 when nothing is kept)."""
        return self.kept_in_class / self.kept if self.kept else 1.0

    @property
    def recall(self) -> float:
        """Share of in-class images that were kept."""
        return self.kept_in_class / self.in_class if self.in_class else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Counts and rates, for JSON."""
        return {
            "kept": self.kept,
            "total": self.total,
            "in_class": self.in_class,
            "kept_in_class": self.kept_in_class,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
        }


def filter_quality(kept: Tensor, in_class: Tensor) -> FilterQuality:
    """Precision and recall of a kept mask against the ground truth (both N bool)."""
    kept, in_class = kept.bool(), in_class.bool()
    return FilterQuality(
        kept=int(kept.sum()),
        total=int(kept.numel()),
        in_class=int(in_class.sum()),
        kept_in_class=int((kept & in_class).sum()),
    )
