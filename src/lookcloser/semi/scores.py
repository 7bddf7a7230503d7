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
    sims = F.normalize(embeddings.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T
    seen = prototypes.abs().sum(dim=1) > 0
    return torch.where(seen, sims, torch.full_like(sims, -1.0))


def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C x D class means of L2-normalized embeddings (zeros for a class without images)."""
    sums = torch.zeros(num_classes, embeddings.shape[1])
    sums.index_add_(0, labels.long().cpu(), F.normalize(embeddings.float().cpu(), dim=1))
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).clamp_min(1)
    return sums / counts[:, None]


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
