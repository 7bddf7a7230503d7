"""Training methods behind one contract (see base.Method); one file per method."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lookcloser.config import Config
    from lookcloser.methods.base import Method


def _import_builtin_methods() -> None:
    # Each method module registers itself on import.
    from lookcloser.methods import baseline, dcl  # noqa: F401


def build_method(cfg: Config, num_classes: int, pretrained: bool | None = None) -> Method:
    """The method `cfg.method.name` on the backbone `cfg.model`, with typed options, taking
    the metadata `cfg.data.meta_keys`.

    `pretrained=False` skips weight loading (used when a model directory's weights follow).
    """
    from lookcloser.config import method_options
    from lookcloser.methods.base import method_class
    from lookcloser.models.backbones import Backbone

    cls = method_class(cfg.method.get("name", "baseline"))
    options = method_options(cfg, cls.Options)
    load = cfg.model.pretrained if pretrained is None else pretrained
    backbone = Backbone(
        cfg.model.backbone,
        pretrained=load,
        weights=cfg.model.weights if load else None,
        key_map=cfg.model.weights_key_map,
        drop_rate=cfg.model.drop_rate,
        drop_path_rate=cfg.model.drop_path_rate,
    )
    return cls(backbone, num_classes, options, meta_keys=cfg.data.meta_keys)
