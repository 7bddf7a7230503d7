"""Training methods behind one contract (see base.Method); one file per method."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lookcloser.config import Config
    from lookcloser.methods.base import Method


def _import_builtin_methods() -> None:
    # Each method module registers itself on import.
    from lookcloser.methods import baseline, dcl, dcn, racnn, ramstrans, tasn  # noqa: F401


def build_method(cfg: Config, num_classes: int, pretrained: bool | None = None) -> Method:
    """The method `cfg.method.name` on the backbone `cfg.model`, with typed options, taking
    the metadata `cfg.data.meta_keys`.

    The method builds its networks through a `BackboneFactory` (one or several backbones);
    `pretrained=False` skips weight loading (used when a model directory's weights follow).
    """
    from lookcloser.config import method_options
    from lookcloser.methods.base import method_class
    from lookcloser.models.backbones import BackboneFactory
    from lookcloser.models.heads import HeadSpec

    cls = method_class(cfg.method.get("name", "baseline"), cfg.method.get("module"))
    options = method_options(cfg, cls.Options)
    method = cls.build(
        BackboneFactory(cfg.model, pretrained),
        num_classes,
        options,
        head=HeadSpec.from_config(cfg.model),
        meta_keys=cfg.data.meta_keys,
    )
    method.image_size = cfg.data.image_size
    return method
