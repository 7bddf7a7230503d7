"""Class heads: a registry of pooled embedding -> logits layers (`model.head=<name>`).

Every method builds its class heads here, so a head type (cosine, ArcFace, ...) registered
once works with every method. Heads that are not class decision layers (DCL's adversary,
TASN's part heads) are the method's own business.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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
