"""The online strategies: pseudo-labels and FixMatch on the unlabelled images of every batch.

`UnlabelledObjective` is added to any method's loss by the engine (`FGVCSystem`), so both
strategies compose with every method: the teacher labels the unlabelled images with the
method's own inference path (`method(images)`), and the student is trained on them through
the same path.

* The **teacher** is the model validation measures: the EMA model with `trainer.ema_decay`,
  else the current model, in eval mode, without gradients, on the weak view.
* An image is **kept** when the teacher is confident (largest class probability >=
  `semi.threshold`) and, unless `semi.ood_score=none`, its out-of-class score reaches the
  threshold chosen on the val split at the last validation (`scores.val_threshold`). Until the
  first validation there is no threshold, so an OOD-filtered objective adds nothing in the
  first epoch (and skips the teacher pass): the model learns the labelled classes before it
  labels anything.
* The **student** is the model being trained, in train mode: `pseudo_label` trains it on the
  weak view (the one the teacher saw), `fixmatch` on the strong view (RandAugment + erasing),
  with the teacher's class as target. The loss is the cross-entropy summed over kept images
  and divided by all unlabelled images of the batch (FixMatch's normalization), times
  `semi.weight`. The student forward runs on the kept images only: with 70-90 %
  out-of-class images, most are dropped, and the cost follows what is kept.

The bookkeeping (threshold, class prototypes, counters per epoch) lives in buffers and extra
state of this module, which the engine holds, so checkpoints carry it and a resumed run
continues with the same threshold and counts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.config import SemiConfig
from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods.base import Method
from lookcloser.models.modes import eval_mode
from lookcloser.semi.scores import ood_scores, val_threshold

ONLINE = ("pseudo_label", "fixmatch")
_COUNTERS = ("seen", "confident", "passed_ood", "kept")


def logits_and_embeddings(
    method: Method, images: Tensor, embeddings: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Class logits through the method's inference path and (if asked) the pooled embedding of
    its main backbone; one pass when the method classifies the backbone's feature map."""
    if not embeddings:
        return method(images), None
    plain = getattr(method, "crop_fusion", "none") == "none"  # crop fusion: 2B feature rows
    if plain and type(method).forward_features is Method.forward_features:
        features = method.forward_features(images)
        return method.forward_head(features), method.backbone.pool(features)
    return method(images), method.backbone(images)


def fixmatch_mask(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(mask, pseudo-labels): images whose largest class probability reaches `threshold`."""
    confidence, labels = probs.max(dim=1)
    return confidence >= threshold, labels


class UnlabelledObjective(nn.Module):
    """The unlabelled loss of `semi.strategy=pseudo_label|fixmatch` and its bookkeeping."""

    def __init__(self, cfg: SemiConfig, num_classes: int, embedding_dim: int):
        super().__init__()
        if cfg.strategy not in ONLINE:
            raise ConfigError(f"semi.strategy={cfg.strategy} is not an online strategy")
        self.cfg = cfg
        self.num_classes = num_classes
        self.uses_prototypes = cfg.ood_score == "prototype"
        # NaN until the first validation has chosen it.
        self.register_buffer("threshold", torch.tensor(math.nan))
        self.register_buffer("prototypes", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("prototype_sums", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("prototype_counts", torch.zeros(num_classes))
        # This epoch's counters, and per class the pseudo-labels given over the whole run.
        self.register_buffer("counts", torch.zeros(len(_COUNTERS), dtype=torch.long))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.long))
        self.history: list[dict] = []  # one entry per finished epoch (in checkpoints)
        self._val_scores: list[Tensor] = []

    # ---- training ---------------------------------------------------------------------------
    def losses(self, student: Method, teacher: Method, batch: Batch) -> dict[str, Tensor]:
        """The weighted unlabelled loss ('unlabelled') and the kept share, for one batch."""
        weak = batch.unlabelled
        if weak is None:
            raise ConfigError(f"semi.strategy={self.cfg.strategy} needs data.unlabelled")
        strong = batch.unlabelled_strong
        if self.cfg.strategy == "fixmatch" and strong is None:
            raise ConfigError(
                "semi.strategy=fixmatch needs the unlabelled stream's strong view "
                "(the datamodule delivers it when semi.strategy=fixmatch)"
            )
        waiting = self.cfg.ood_score != "none" and torch.isnan(self.threshold)
        if waiting and not self.uses_prototypes:
            # No threshold before the first validation, so nothing can be kept: the teacher
            # does not run (its confidence is not counted either).
            nothing = torch.zeros(len(weak), dtype=torch.bool, device=weak.device)
            self._count(nothing, nothing, nothing, nothing.long())
            return {"unlabelled": weak.new_zeros(()), "kept": weak.new_zeros(())}
        n_labelled = len(batch)
        with torch.no_grad(), eval_mode(teacher):
            # Labelled images go through the teacher too when they feed the class prototypes.
            images = torch.cat([batch.images, weak]) if self.uses_prototypes else weak
            logits, embeddings = logits_and_embeddings(teacher, images, self.uses_prototypes)
            if self.uses_prototypes:
                self._add_to_prototypes(embeddings[:n_labelled], batch.targets)
                logits, embeddings = logits[n_labelled:], embeddings[n_labelled:]
            confident, labels = fixmatch_mask(logits.float().softmax(dim=1), self.cfg.threshold)
            passed = self._passes_ood(logits, embeddings)
            kept = confident & passed
        self._count(confident, passed, kept, labels)
        loss = weak.new_zeros(())
        if kept.any():
            inputs = strong if self.cfg.strategy == "fixmatch" else weak
            # A single kept image goes with its batch: batch norm cannot train on one image
            # whose last feature map is 1 x 1.
            chosen = kept if kept.sum() > 1 else torch.ones_like(kept)
            student_logits = student(inputs[chosen])[kept[chosen]]
            loss = F.cross_entropy(student_logits, labels[kept], reduction="sum") / len(weak)
        return {
            "unlabelled": self.cfg.weight * loss,
            "kept": kept.float().mean(),
        }

    def _passes_ood(self, logits: Tensor, embeddings: Tensor | None) -> Tensor:
        if self.cfg.ood_score == "none":
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        if torch.isnan(self.threshold):
            return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        scores = ood_scores(self.cfg.ood_score, logits, embeddings, self.prototypes)
        return scores >= self.threshold

    def _add_to_prototypes(self, embeddings: Tensor, targets: Tensor) -> None:
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixup: main class
        self.prototype_sums.index_add_(0, labels, F.normalize(embeddings.float(), dim=1))
        self.prototype_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))

    def _count(self, confident: Tensor, passed: Tensor, kept: Tensor, labels: Tensor) -> None:
        values = [len(kept), confident.sum(), passed.sum(), kept.sum()]
        self.counts += torch.stack([torch.as_tensor(v, device=self.counts.device) for v in values])
        self.class_counts += torch.bincount(labels[kept], minlength=self.num_classes)

    def end_epoch(self, epoch: int) -> None:
        """Record this epoch's counters (summed over processes) and start the next epoch's."""
        counts = _summed(self.counts.clone())
        entry = {name: int(v) for name, v in zip(_COUNTERS, counts.tolist(), strict=True)}
        threshold = float(self.threshold)
        entry.update(epoch=epoch, threshold=None if math.isnan(threshold) else threshold)
        self.history.append(entry)
        self.counts.zero_()

    # ---- validation: the threshold ----------------------------------------------------------
    def start_validation(self) -> None:
        """New class prototypes from the labelled images seen since the last validation."""
        self._val_scores = []
        if not self.uses_prototypes:
            return
        sums, counts = _summed(self.prototype_sums.clone()), _summed(self.prototype_counts.clone())
        seen = counts > 0
        self.prototypes[seen] = sums[seen] / counts[seen, None]
        self.prototype_sums.zero_()
        self.prototype_counts.zero_()

    def observe_validation(self, teacher: Method, images: Tensor, logits: Tensor) -> None:
        """Keep the teacher's OOD scores of a val batch (its logits computed by the caller)."""
        if self.cfg.ood_score == "none":
            return
        embeddings = teacher.backbone(images) if self.uses_prototypes else None
        scores = ood_scores(self.cfg.ood_score, logits, embeddings, self.prototypes)
        self._val_scores.append(scores.detach().float())

    def end_validation(self) -> None:
        """The threshold that keeps `semi.val_keep` of the val images."""
        if not self._val_scores:
            return
        self.threshold.fill_(val_threshold(torch.cat(self._val_scores), self.cfg.val_keep))
        self._val_scores = []

    # ---- checkpoints --------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The per-epoch history (saved in checkpoints beside the buffers)."""
        return {"history": list(self.history)}

    def set_extra_state(self, state: dict) -> None:
        """Restore the per-epoch history from a checkpoint."""
        self.history = list(state.get("history", []))

    def summary(self) -> dict:
        """The bookkeeping as JSON: threshold, per-epoch counts, pseudo-labels per class."""
        threshold = float(self.threshold)
        return {
            "strategy": self.cfg.strategy,
            "ood_score": self.cfg.ood_score,
            "threshold": None if math.isnan(threshold) else threshold,
            "confidence_threshold": self.cfg.threshold,
            "epochs": list(self.history),
            "pseudo_labels_per_class": self.class_counts.tolist(),
        }


def _summed(tensor: Tensor) -> Tensor:
    """The tensor summed over DDP processes (itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor
