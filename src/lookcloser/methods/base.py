"""The Method contract: one model, its training losses, its inference path, its attention map.

A method never knows about files, devices or the training loop: the engine calls
`training_losses` with a typed `Batch` during training; everything after training (predict,
eval, explain, export, serve) calls `forward` and `attention`. Extra training-time views
(destroyed images, attention-sampled images, crops) are made inside the method, on tensors.

Metadata (`data.meta_keys`) reaches a method as two tensors next to the images: `meta`
(B x K float32, 0 where missing) and `meta_mask` (B x K bool, True where present), in the
order of `self.meta_keys`. Only methods with `accepts_meta = True` may be trained with
metadata; the others receive None and ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.models.backbones import Backbone


@dataclass
class NoOptions:
    """A method without options."""


class Method(nn.Module):
    """Backbone + heads + losses. Subclasses set `name`, `Options` and the forward split."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Whether forward / forward_head use `meta` (a model trained with data.meta_keys needs it).
    accepts_meta: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: Any = None,
        meta_keys: Sequence[str] = (),
    ):
        super().__init__()
        if meta_keys and not self.accepts_meta:
            raise ConfigError(
                f"data.meta_keys: method {self.name!r} does not use metadata; leave "
                "data.meta_keys empty or choose a method that takes it"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.options = options if options is not None else self.Options()
        self.meta_keys = list(meta_keys)

    # ---- inference path -----------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """The feature map the classifier reads (and Grad-CAM explains)."""
        return self.backbone.forward_features(images)

    def forward_head(
        self, features: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Class logits from a feature map (and the metadata, for methods that accept it)."""
        raise NotImplementedError

    def forward(
        self, images: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Class logits for RGB images in [0, 1] (B x 3 x H x W), with optional metadata."""
        return self.forward_head(self.forward_features(images), meta, meta_mask)

    def attention(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
    ) -> Tensor:
        """A B x H x W map in [0, 1] of where the model looked (Grad-CAM unless overridden)."""
        from lookcloser.explain.cam import grad_cam

        return grad_cam(self, images, target, meta, meta_mask)

    def attention_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Every map this method can show, by name (B x H x W each); the first is the default."""
        return {"grad-cam": self.attention(images, target, meta, meta_mask)}

    # ---- training ---------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Losses for one batch: 'loss' (what is optimized) plus named parts to log.

        `batch.targets` are class indices (B,) or, under mixup/cutmix, class probabilities
        (B x C); `batch.unlabelled` holds the unlabelled images drawn beside it, if any.
        """
        raise NotImplementedError

    def new_modules(self) -> list[nn.Module]:
        """Modules trained from scratch (they get `optim.head_lr_scale` x the learning rate)."""
        return []

    def for_inference(self) -> Method:
        """The method to save and serve; training-only branches may be dropped here."""
        return self


MethodType = type[Method]
METHODS: dict[str, MethodType] = {}


def register_method(cls: MethodType) -> MethodType:
    """Class decorator: make a method selectable with `method.name=<cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> MethodType:
    """The registered Method class called `name`."""
    from lookcloser.config import ConfigError
    from lookcloser.methods import _import_builtin_methods

    _import_builtin_methods()
    if name not in METHODS:
        raise ConfigError(
            f"method.name: unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]
