"""A test method that takes metadata, shared by the tests that need one (serve, export,
the server's security tests, the metadata flow): registered once, on first import."""

from __future__ import annotations

import torch
from torch import nn

from lookcloser.methods.base import register_method
from lookcloser.methods.baseline import Baseline

META_METHOD = "test-meta-baseline"


@register_method
class MetaBaseline(Baseline):
    """The baseline's logits plus a linear term of (meta * mask, mask)."""

    name = META_METHOD
    accepts_meta = True

    def __init__(self, backbone, num_classes, options=None, **kwargs):
        super().__init__(backbone, num_classes, options, **kwargs)
        self.meta_head = nn.Linear(2 * len(self.meta_keys), num_classes)

    def forward_head(self, features, meta=None, meta_mask=None):
        """Image logits plus a linear term of the metadata (the Predictor always passes it)."""
        logits = super().forward_head(features)
        mask = meta_mask.float()
        return logits + self.meta_head(torch.cat([meta * mask, mask], dim=1))

    def new_modules(self):
        """The heads are new."""
        return [self.head, self.meta_head]
