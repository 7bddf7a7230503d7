"""A trained model's pass over the labelled and unlabelled images: scores and the filter.

Used after online training (what the final model keeps) and by cluster_pretrain (which
unlabelled images the fine-tuned model selects as close to the labelled classes for the next
round). One pass over train (class prototypes), val (thresholds) and the unlabelled images,
with the evaluation transform; every score kind is computed, so the record can compare them,
and the one `semi.ood_score` names decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

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
    class_prototypes,
    filter_quality,
    ood_scores,
    val_threshold,
)


@dataclass
class Outputs:
    """Logits and embeddings of a list of samples, in order."""

    logits: Tensor
    embeddings: Tensor
    labels: Tensor


@torch.no_grad()
def run_model(
    method: Method,
    samples: Sequence[Sample],
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = True,
    description: str = "embed",
    device: str | torch.device = "cpu",
    logits: bool = True,
) -> Outputs:
    """The method's logits and its main backbone's pooled embeddings for `samples`.

    With `logits=False` only the backbone runs (a model without class head, e.g. ImageNet
    weights before any labelled training); `logits` is then empty.
    """
    dataset = ImageDataset(samples, transform, max_pixels or 89_478_485)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    all_logits, embeddings, labels = [], [], []
    method = method.to(device)
    with eval_mode(method):
        for batch in track(loader, description, enabled=progress):
            images = batch.images.to(device)
            if logits:
                out, emb = logits_and_embeddings(method, images)
                all_logits.append(out.float().cpu())
            else:
                emb = method.backbone(images)
            embeddings.append(emb.float().cpu())
            labels.append(batch.targets)
    if not embeddings:
        return Outputs(torch.empty(0, 0), torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    return Outputs(
        torch.cat(all_logits) if all_logits else torch.empty(0, 0),
        torch.cat(embeddings),
        torch.cat(labels),
    )


def all_scores(outputs: Outputs, prototypes: Tensor) -> dict[str, Tensor]:
    """Every OOD score kind for these outputs."""
    return {
        name: ood_scores(name, outputs.logits, outputs.embeddings, prototypes) for name in SCORES
    }


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
) -> tuple[dict, list[dict], Tensor]:
    """(record, rows, kept mask) of the confidence + OOD filter of `method` over `unlabelled`.

    Thresholds per score kind keep `semi.val_keep` of the val images; the kind
    `semi.ood_score` names (none: confidence alone) and `semi.threshold` decide what is kept.
    With ground truth, the record holds each score's precision and recall at its threshold.
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
    labelled = run_model(method, train, description=f"{name}: labelled images", **common)
    prototypes = class_prototypes(labelled.embeddings, labelled.labels, len(classes))
    val_out = run_model(method, val, description=f"{name}: val images", **common)
    thresholds = {
        kind: val_threshold(scores, semi.val_keep)
        for kind, scores in all_scores(val_out, prototypes).items()
    }
    out = run_model(method, unlabelled, description=f"{name}: unlabelled images", **common)
    scores = all_scores(out, prototypes)
    confidence, predicted = out.logits.softmax(dim=1).max(dim=1)
    confident = confidence >= semi.threshold
    if semi.ood_score == "none":
        in_class = torch.ones_like(confident)
    else:
        in_class = scores[semi.ood_score] >= thresholds[semi.ood_score]
    kept = confident & in_class
    reasons = [
        _reason(bool(c), bool(i), semi.ood_score) for c, i in zip(confident, in_class, strict=True)
    ]
    truth = ground_truth(cfg.data.unlabelled)
    rows = [
        {
            "path": s.path,
            "predicted": classes[int(predicted[i])],
            "confidence": f"{float(confidence[i]):.5f}",
            **{kind: f"{float(scores[kind][i]):.5f}" for kind in SCORES},
            "kept": str(bool(kept[i])),
            "reason": reasons[i],
            **truth_columns(s.path, truth),
        }
        for i, s in enumerate(unlabelled)
    ]
    record = {
        "name": name,
        "kind": "filter",
        "total": len(unlabelled),
        "kept": int(kept.sum()),
        "reasons": dict(Counter(reasons)),
        "ood_score": semi.ood_score,
        "val_keep": semi.val_keep,
        "confidence_threshold": semi.threshold,
        "thresholds": thresholds,
        "val_images": len(val),
        "kept_per_class": dict(Counter(r["predicted"] for r in rows if r["kept"] == "True")),
    }
    if truth and all(r["in_class"] for r in rows):
        actual = torch.tensor([r["in_class"] == "True" for r in rows])
        record["quality"] = {
            "filter": filter_quality(kept, actual).as_dict(),
            "confidence only": filter_quality(confident, actual).as_dict(),
            **{
                f"{kind} only": filter_quality(scores[kind] >= thresholds[kind], actual).as_dict()
                for kind in SCORES
            },
        }
        # How often the pseudo-label is right on the kept images that are in-class.
        correct = [
            r["predicted"] == r["true_class"]
            for r in rows
            if r["kept"] == "True" and r["in_class"] == "True"
        ]
        record["pseudo_label_accuracy"] = round(sum(correct) / len(correct), 4) if correct else None
    return record, rows, kept


def _reason(confident: bool, in_class: bool, ood_score: str) -> str:
    if confident and in_class:
        return "kept"
    if not confident and not in_class:
        return f"low confidence and low {ood_score} score"
    return "low confidence" if not confident else f"low {ood_score} score"
