"""Class heads: a registry of pooled embedding -> logits layers (`model.head=<name>`).

Every method builds its class heads here, so a head type (cosine, ArcFace, ...) registered
once works with every method. Heads that are not class decision layers (DCL's adversary,
TASN's part heads) are the method's own business.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.errors import ConfigError

HeadFactory = Callable[..., nn.Module]
HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Register `fn(in_features, num_classes, **options) -> nn.Module` as `model.head=<name>`."""

    def wrap(fn: HeadFactory) -> HeadFactory:
        HEADS[name] = fn
        return fn

    return wrap


def head_factory(name: str) -> HeadFactory:
    """The factory registered as `name`, or a ConfigError listing the registered heads."""
    if name not in HEADS:
        raise ConfigError(
            f"model.head: unknown head {name!r}; available: {', '.join(sorted(HEADS))}"
        )
    return HEADS[name]


def build_head(name: str, in_features: int, num_classes: int, **options) -> nn.Module:
    """The registered head `name`: B x in_features embeddings -> B x num_classes logits."""
    return head_factory(name)(in_features, num_classes, **options)


@register_head("linear")
def linear_head(in_features: int, num_classes: int, bias: bool = True) -> nn.Module:
    """A plain linear classifier."""
    return nn.Linear(in_features, num_classes, bias=bias)


# ---- prototype head (semi-supervised learning, long tails: issue 13) ------------------------------
class PrototypeHead(nn.Module):
    """Class logits from the cosine similarity of the embedding to learned class prototypes.

    Each class has `per_class` prototypes (unit vectors); its logit is a soft maximum of the
    embedding's cosine similarity to them, `logsumexp_k(scale * cos_k) - log(per_class)` (equal
    to `scale * cos` when the prototypes agree). Against long tails and scarce classes: every
    prototype has unit norm and there is no bias, so a frequent class cannot win by a larger
    weight norm or bias as it does in a linear head (the imbalance that classifier
    re-balancing corrects, Kang et al. 2020); several prototypes let a class cover several
    looks (poses, sexes, stages), as prototype-based training in the iNat 2021
    semi-supervised winner does.
    """

    def __init__(self, in_features: int, num_classes: int, per_class: int = 3, scale: float = 16.0):
        super().__init__()
        if per_class < 1 or scale <= 0:
            raise ConfigError(
                f"prototype head: expected per_class >= 1 and scale > 0, got {per_class}, {scale}"
            )
        self.num_classes = num_classes
        self.per_class = per_class
        self.scale = scale
        self.prototypes = nn.Parameter(torch.randn(num_classes * per_class, in_features))

    def forward(self, embeddings: Tensor) -> Tensor:
        """B x num_classes logits in [-scale, scale]."""
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.prototypes, dim=1).T
        cosine = cosine.view(len(embeddings), self.num_classes, self.per_class)
        return torch.logsumexp(self.scale * cosine, dim=2) - math.log(self.per_class)


@register_head("prototype")
def prototype_head(
    in_features: int, num_classes: int, per_class: int = 3, scale: float = 16.0
) -> nn.Module:
    """Scaled cosine similarity to `per_class` learned prototypes per class (PrototypeHead)."""
    return PrototypeHead(in_features, num_classes, per_class, scale)
