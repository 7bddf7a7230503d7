"""A trained model's pass over the labelled and unlabelled images: scores and the filter.

Used after online training (what the final model keeps) and by cluster_pretrain (which
unlabelled images the fine-tuned model selects as close to the labelled classes for the next
round). One pass over train (class prototypes), val (thresholds) and the unlabelled images,
with the evaluation transform; every score kind is computed, so the record can compare them,
and the one `semi.ood_score` names decides.

Each pass keeps per image only what the rest needs, computed batch by batch: the train pass
per-class sums and counts of embeddings (C x D), the val and unlabelled passes a few scalars
per image (scores, predicted class). Never the N x C logits: at 10,000 classes and 300k
images they are 12 GB.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lookcloser.arrays import GrowingArray
from lookcloser.config import Config
from lookcloser.data.batch import collate
from lookcloser.data.loading import ImageDataset
from lookcloser.data.sources import Sample
from lookcloser.methods.base import Method
from lookcloser.models.modes import eval_mode
from lookcloser.progress import track
from lookcloser.semi.online import logits_and_embeddings
from lookcloser.semi.records import ground_truth, truth_columns
from lookcloser.semi.scores import (
    SCORES,
    BatchScorer,
    PrototypeSums,
    filter_quality,
    val_threshold,
)


def _batches(
    samples: Sequence[Sample],
    transform: Callable,
    batch_size: int,
    num_workers: int,
    max_pixels: int | None,
    progress: bool,
    description: str,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of `samples`, in order, with the evaluation transform."""
    dataset = ImageDataset(samples, transform, max_pixels or 89_478_485)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    for batch in track(loader, description, enabled=progress):
        yield batch.images, batch.targets


@torch.no_grad()
def embed(
    method: Method,
    samples: Sequence[Sample],
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = True,
    description: str = "embed",
    device: str | torch.device = "cpu",
) -> Tensor:
    """N x D pooled embeddings of the method's main backbone for `samples`, in order.

    Only the backbone runs (no class logits: a model without class head works too, e.g.
    ImageNet weights before any labelled training). The caller clusters all N at once.
    """
    method = method.to(device)
    embeddings: GrowingArray | None = None  # its row length comes with the first batch
    with eval_mode(method):
        for images, _ in _batches(
            samples, transform, batch_size, num_workers, max_pixels, progress, description
        ):
            batch = method.backbone(images.to(device)).float()
            if embeddings is None:
                embeddings = GrowingArray(np.float32, (batch.shape[1],), capacity=len(samples))
            embeddings.extend(batch)
    return embeddings.take_tensor() if embeddings is not None else torch.empty(0, 0)


@torch.no_grad()
def labelled_prototypes(
    method: Method,
    samples: Sequence[Sample],
    num_classes: int,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = True,
    description: str = "labelled images",
    device: str | torch.device = "cpu",
) -> Tensor:
    """C x D class prototypes of labelled `samples` from running per-class sums and counts."""
    method = method.to(device)
    sums = PrototypeSums(num_classes)
    with eval_mode(method):
        for images, labels in _batches(
            samples, transform, batch_size, num_workers, max_pixels, progress, description
        ):
            sums.add(method.backbone(images.to(device)), labels)
    return sums.prototypes(method.backbone.num_features)


@dataclass
class Scored:
    """Per image scalars of one pass, in sample order (each N long): every score kind, the
    predicted class, its confidence and the sample's label."""

    scores: dict[str, Tensor]
    predicted: Tensor
    labels: Tensor

    @property
    def confidence(self) -> Tensor:
        """The predicted class's probability (the `max_softmax` score)."""
        return self.scores["max_softmax"]


@torch.no_grad()
def score_images(
    method: Method,
    samples: Sequence[Sample],
    prototypes: Tensor,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = True,
    description: str = "score",
    device: str | torch.device = "cpu",
) -> Scored:
    """Every OOD score kind, the predicted class and its confidence of each of `samples`.

    Scored batch by batch on `device`: only N scalars per kind are kept, never the N x C
    logits (at 10,000 classes they are 40 KB per image).
    """
    method = method.to(device)
    scorer = BatchScorer(prototypes).to(device)
    # Growing arrays, not per-batch lists: see lookcloser.arrays (heap fragmentation).
    n = len(samples)
    scores = {kind: GrowingArray(np.float32, capacity=n) for kind in SCORES}
    predicted, labels = GrowingArray(np.int64, capacity=n), GrowingArray(np.int64, capacity=n)
    with eval_mode(method):
        for images, targets in _batches(
            samples, transform, batch_size, num_workers, max_pixels, progress, description
        ):
            batch_scores, batch_predicted = scorer(
                *logits_and_embeddings(method, images.to(device))
            )
            for kind, values in batch_scores.items():
                scores[kind].extend(values.float())
            predicted.extend(batch_predicted)
            labels.extend(targets)
    return Scored(
        {kind: values.take_tensor() for kind, values in scores.items()},
        predicted.take_tensor(),
        labels.take_tensor(),
    )


def filter_stage(
    name: str,
    method: Method,
    cfg: Config,
    train: Sequence[Sample],
    val: Sequence[Sample],
    unlabelled: Sequence[Sample],
    classes: Sequence[str],
    transform: Callable,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[dict, Sequence[dict], Tensor]:
    """(record, rows, kept mask) of the confidence + OOD filter of `method` over `unlabelled`.

    Thresholds per score kind keep `semi.val_keep` of the val images; the kind
    `semi.ood_score` names (none: confidence alone) and `semi.threshold` decide what is kept.
    With ground truth, the record holds each score's precision and recall at its threshold.
    One pass per split, each keeping per image only scalars (the train pass: C x D sums);
    the rows are made one at a time as they are read (records.write_stage).
    """
    semi = cfg.semi
    common = {
        "transform": transform,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "max_pixels": cfg.data.max_image_pixels,
        "progress": progress,
        "device": device,
    }
    prototypes = labelled_prototypes(
        method, train, len(classes), description=f"{name}: labelled images", **common
    )
    val_out = score_images(method, val, prototypes, description=f"{name}: val images", **common)
    thresholds = {
        kind: val_threshold(scores, semi.val_keep) for kind, scores in val_out.scores.items()
    }
    out = score_images(
        method, unlabelled, prototypes, description=f"{name}: unlabelled images", **common
    )
    confident = out.confidence >= semi.threshold
    if semi.ood_score == "none":
        in_class = torch.ones_like(confident)
    else:
        in_class = out.scores[semi.ood_score] >= thresholds[semi.ood_score]
    kept = confident & in_class
    truth = ground_truth(cfg.data.unlabelled)
    rows = FilterRows(unlabelled, classes, out, confident, in_class, semi.ood_score, truth)
    predicted = [classes[int(i)] for i in out.predicted[kept].tolist()]
    record = {
        "name": name,
        "kind": "filter",
        "total": len(unlabelled),
        "kept": int(kept.sum()),
        "reasons": dict(Counter(rows.reasons())),
        "ood_score": semi.ood_score,
        "val_keep": semi.val_keep,
        "confidence_threshold": semi.threshold,
        "thresholds": thresholds,
        "val_images": len(val),
        "kept_per_class": dict(Counter(predicted)),
    }
    if truth and all(t["in_class"] for t in rows.truths):
        actual = torch.tensor([t["in_class"] == "True" for t in rows.truths])
        record["quality"] = {
            "filter": filter_quality(kept, actual).as_dict(),
            "confidence only": filter_quality(confident, actual).as_dict(),
            **{
                f"{kind} only": filter_quality(
                    out.scores[kind] >= thresholds[kind], actual
                ).as_dict()
                for kind in SCORES
            },
        }
        # How often the pseudo-label is right on the kept images that are in-class.
        correct = [
            classes[p] == t["true_class"]
            for p, k, t in zip(out.predicted.tolist(), kept.tolist(), rows.truths, strict=True)
            if k and t["in_class"] == "True"
        ]
        record["pseudo_label_accuracy"] = round(sum(correct) / len(correct), 4) if correct else None
    return record, rows, kept


class FilterRows(Sequence):
    """The filter stage's CSV rows (one per unlabelled image), each made when it is read:
    N row dicts of formatted strings are ~1 KB per image, the scalars they come from 20 B."""

    CHUNK = 4096

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        scored: Scored,
        confident: Tensor,
        in_class: Tensor,
        ood_score: str,
        truth: dict[str, dict] | None,
    ):
        self.samples, self.classes, self.scored, self.ood_score = (
            samples,
            classes,
            scored,
            ood_score,
        )
        self.confident, self.in_class = confident, in_class
        # The ground truth per image only where the unlabelled folder records it.
        self.truths = [truth_columns(s.path, truth) for s in samples] if truth else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, str]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return next(self._rows(i, i + 1))

    def __iter__(self) -> Iterator[dict[str, str]]:
        for start in range(0, len(self), self.CHUNK):
            yield from self._rows(start, min(start + self.CHUNK, len(self)))

    def _rows(self, start: int, stop: int) -> Iterator[dict[str, str]]:
        # Python lists per chunk: element-wise tensor indexing costs microseconds a value.
        scored = self.scored
        predicted = scored.predicted[start:stop].tolist()
        confidence = scored.confidence[start:stop].tolist()
        scores = {kind: scored.scores[kind][start:stop].tolist() for kind in SCORES}
        confident = self.confident[start:stop].tolist()
        in_class = self.in_class[start:stop].tolist()
        for j, i in enumerate(range(start, stop)):
            path = self.samples[i].path
            yield {
                "path": path,
                "predicted": self.classes[predicted[j]],
                "confidence": f"{confidence[j]:.5f}",
                **{kind: f"{scores[kind][j]:.5f}" for kind in SCORES},
                "kept": str(confident[j] and in_class[j]),
                "reason": _reason(confident[j], in_class[j], self.ood_score),
                **(self.truths[i] if self.truths else truth_columns(path, None)),
            }

    def reasons(self) -> Iterator[str]:
        """Each image's reason, in order."""
        for confident, in_class in zip(
            self.confident.tolist(), self.in_class.tolist(), strict=True
        ):
            yield _reason(confident, in_class, self.ood_score)


def _reason(confident: bool, in_class: bool, ood_score: str) -> str:
    if confident and in_class:
        return "kept"
    if not confident and not in_class:
        return f"low confidence and low {ood_score} score"
    return "low confidence" if not confident else f"low {ood_score} score"
