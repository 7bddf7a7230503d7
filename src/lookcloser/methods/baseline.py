"""The baseline: backbone + class head, trained with label-smoothed cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import BaselineOptions
from lookcloser.models.backbones import Backbone
from lookcloser.models.heads import HeadSpec


@register_method
class Baseline(Method):
    """A plain global classifier: the reference every fine-grained method must beat."""

    name = "baseline"
    Options = BaselineOptions
    supports_crop_fusion = True

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: BaselineOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        self.head = self.make_head(backbone.num_features)

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """Logits from the pooled feature map."""
        return self.apply_head(self.head, self.backbone.pool(features), meta, meta_mask)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Label-smoothed cross-entropy on the images as given (with their crops, if any)."""
        logits = self(batch.images, batch.meta, batch.meta_mask, crops=batch.crops)
        loss = self.class_loss(logits, batch.targets, self.options.label_smoothing)
        return {"loss": loss}

    def new_modules(self) -> list[nn.Module]:
        """The class head is new."""
        return [self.head]
