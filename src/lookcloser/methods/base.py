"""The Method contract: one model, its training losses, its inference path, its attention map.

A method never knows about files, devices or the training loop: the engine calls
`training_losses` with a typed `Batch` during training; everything after training (predict,
eval, explain, export, serve) calls `forward` and `attention`. Extra training-time views
(destroyed images, attention-sampled images, crops) are made inside the method, on tensors.

Metadata (`data.meta_keys`) reaches a method as two tensors next to the images: `meta`
(B x K float32, 0 where missing) and `meta_mask` (B x K bool, True where present), in the
order of `self.meta_keys`. A method may be trained with metadata when it uses it itself
(`accepts_meta = True`) or when `model.fusion` joins it to every class head: then every head
from `make_head` takes it, and methods call their heads through `apply_head`.

Object-crop fusion (`model.crop_fusion`, models/crops.py) is the base class's too: a method
whose class decision is `head(pool(forward_features(x)))` with one head from `make_head` sets
`supports_crop_fusion = True` and passes `batch.crops` to its forward in training; every
other method refuses the option with a ConfigError naming it.

Class-head logits are trained through `class_loss`, which applies the head type's margin
(ArcFace) before the cross-entropy, so a margin head works with every method.

Methods register with `@register_method`. Methods defined outside the package are found
through `method.module=<importable module>` (imported before the name is resolved) or the
`lookcloser.methods` entry-point group (loaded when a name is not registered).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods.options import ENTRY_POINT_GROUP, REGISTERED_OPTIONS, unknown_method
from lookcloser.models.backbones import Backbone, BackboneFactory
from lookcloser.models.heads import HeadSpec


@dataclass
class NoOptions:
    """A method without options."""


class Method(nn.Module):
    """Backbone + heads + losses. Subclasses set `name`, `Options` and the forward split.

    `training_only` names the child modules used by `training_losses` alone (DCL's
    adversary): `for_inference()` drops them, so they are neither saved nor loaded.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    training_only: ClassVar[tuple[str, ...]] = ()
    # Whether forward / forward_head use `meta` themselves (a model trained with
    # data.meta_keys needs it, unless model.fusion feeds it to the class heads).
    accepts_meta: ClassVar[bool] = False
    # Whether model.crop_fusion composes with the method: its class decision is one head from
    # make_head on the pooled base forward_features (see models/crops.py).
    supports_crop_fusion: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: Any = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ):
        super().__init__()
        spec = head if isinstance(head, HeadSpec) else HeadSpec(head)
        check_meta_use(self.name, self.accepts_meta, spec, meta_keys)
        check_crop_use(self.name, self.supports_crop_fusion, spec)
        self.crop_fusion = spec.crop_fusion  # none | concat | add
        self.crop_alpha = spec.crop_alpha
        self.backbone = backbone
        self.num_classes = num_classes
        self.options = options if options is not None else self.Options()
        self.head_spec = spec
        self.head_type = spec.name
        self.meta_keys = list(meta_keys)
        self.inference_only = False  # True on for_inference() copies
        # data.image_size, set by build_method: the size of the images the classifier sees.
        self.image_size: int | None = None

    @property
    def input_size(self) -> int | None:
        """The size of the images the model takes (loaders and the Predictor resize to it).

        data.image_size unless a method samples its own views from larger inputs (TASN).
        """
        return self.image_size

    @classmethod
    def build(
        cls,
        make_backbone: BackboneFactory,
        num_classes: int,
        options: Any,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ) -> Method:
        """The method on backbones from `make_backbone`; override to build several or edit them."""
        return cls(make_backbone(), num_classes, options, head=head, meta_keys=meta_keys)

    def make_head(self, in_features: int) -> nn.Module:
        """A class head of the configured type (`model.head`): embeddings -> class logits,
        with the metadata fused in front of it when `model.fusion` is set. Call it through
        `apply_head` and train its logits with `class_loss`."""
        return self.head_spec.build(in_features, self.num_classes, self.meta_keys)

    @staticmethod
    def apply_head(
        head: nn.Module, x: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Logits of a head from `make_head` on embeddings `x`, passing the metadata to a head
        that fuses it (`meta` None: the image-only path)."""
        if getattr(head, "takes_meta", False):
            return head(x, meta, meta_mask)
        return head(x)

    def class_loss(self, logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy of a class head's logits (from `make_head`), after the head type's
        training margin (ArcFace: the target class's angle grows by model.head_margin).
        `targets`: class indices, or class probabilities under mixup / cutmix."""
        logits = self.head_spec.training_logits(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    # ---- inference path -----------------------------------------------------------------
    def forward_features(self, images: Tensor, crops: Tensor | None = None) -> Tensor:
        """The feature map the classifier reads (and Grad-CAM explains).

        With crop fusion: the images' maps, then their crops' (2B rows); `crops` (B x 3 x H x W,
        cut from boxes of the data) or, when None, crops from the model's attention.
        """
        if self.crop_fusion == "none":
            return self.backbone.forward_features(images)
        from lookcloser.models.crops import fused_features

        return fused_features(self, images, crops)

    def forward_head(
        self, features: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """Class logits from a feature map (and the metadata, for methods that accept it)."""
        raise NotImplementedError

    def forward(
        self,
        images: Tensor,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
        crops: Tensor | None = None,
    ) -> Tensor:
        """Class logits for RGB images in [0, 1] (B x 3 x H x W), with optional metadata and,
        for crop fusion, optional object crops (None: from the model's attention)."""
        if crops is None:
            return self.forward_head(self.forward_features(images), meta, meta_mask)
        if self.crop_fusion == "none":
            raise ConfigError(f"crops: method {self.name!r} was built without model.crop_fusion")
        return self.forward_head(self.forward_features(images, crops), meta, meta_mask)

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
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """Every map this method can show, by name (B x H x W each); the first is the default.

        `part`: a method with part maps (`part_count() > 0`) shows part `part` instead.
        """
        self.check_part(part)
        return {"grad-cam": self.attention(images, target, meta, meta_mask)}

    def views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """Images the method derives from the input to classify (B x 3 x h x w in [0, 1]),
        by name; explain shows them beside the map. None for most methods; with crop fusion,
        the attention box on the image and its crop."""
        self.check_part(part)
        if self.crop_fusion == "none":
            return {}
        from lookcloser.models.crops import attention_crops
        from lookcloser.models.modes import eval_mode
        from lookcloser.models.zoom import draw_boxes

        with eval_mode(self), torch.no_grad():
            _, boxes, crops = attention_crops(self, images)
        return {"crop box (attention)": draw_boxes(images, boxes), "crop": crops}

    def part_count(self) -> int:
        """How many part maps `attention_maps(part=K)` can show (0: none)."""
        return 0

    # ---- what explain shows: the method's maps and views, then its backbones' plug-ins --------
    def named_backbones(self) -> dict[str, Backbone]:
        """The method's networks by name (their module paths unless a method names them)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Backbone)}

    def _plugin_backbones(self) -> list[tuple[str, Backbone]]:
        """(name prefix, backbone) of the networks with plug-ins; no prefix when only one."""
        found = [(n, b) for n, b in self.named_backbones().items() if b.has_plugins()]
        return [("" if len(found) == 1 else f"{n}: ", b) for n, b in found]

    def explain_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """Every map explain can show: `attention_maps` (its first stays the default), then the
        maps of the attention plug-ins in the method's networks (CBAM's spatial attention),
        each network run on `images`."""
        maps = self.attention_maps(images, target, meta, meta_mask, part=part)
        for prefix, backbone in self._plugin_backbones():
            for name, heatmap in backbone.plugin_maps(images).items():
                maps.setdefault(f"{prefix}{name}", heatmap)
        return maps

    def explain_views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """Every picture explain shows beside the map: `views`, then the plug-ins' (the STN's
        warped input, the attention blocks' channel weights as a bar chart per stage)."""
        views = self.views(images, part=part)
        for prefix, backbone in self._plugin_backbones():
            for name, picture in backbone.plugin_views(images).items():
                views.setdefault(f"{prefix}{name}", picture)
        return views

    def check_part(self, part: int | None) -> None:
        """ConfigError unless `part` is None or a part map index of this method."""
        if part is None:
            return
        count = self.part_count()
        if not count:
            raise ConfigError(f"--part: method {self.name!r} has no part maps")
        if not 0 <= part < count:
            raise ConfigError(f"--part: expected a part map index in 0..{count - 1}, got {part}")

    # ---- training ---------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Losses for one batch: 'loss' (what is optimized) plus named parts to log.

        `batch.targets` are class indices (B,) or, under mixup/cutmix, class probabilities
        (B x C); `batch.unlabelled` holds the unlabelled images drawn beside it, if any.
        """
        raise NotImplementedError

    def new_modules(self) -> list[nn.Module]:
        """Modules trained from scratch (they get `optim.head_lr_scale` x the learning rate).

        Backbones' declared `new_prefixes` count as new too, without being listed here.
        """
        return []

    def lr_scales(self) -> list[tuple[nn.Module, float]]:
        """Modules that learn at their own multiple of `optim.lr`, whatever else they are
        (a localisation net whose output saturates or leaves the image at the head's rate)."""
        return []

    def for_inference(self) -> Method:
        """The method to save and serve: a copy without `training_only` parts, sharing weights."""
        if not any(name in self._modules for name in self.training_only):
            return self
        model = copy.copy(self)
        # The copy gets its own registries (modules, parameters, buffers, hooks); the modules
        # and tensors in them stay shared.
        for key, value in vars(self).items():
            if key.startswith("_") and isinstance(value, dict | set):
                model.__dict__[key] = copy.copy(value)
        for name in self.training_only:
            model._modules.pop(name, None)
        model.inference_only = True
        return model


def check_crop_use(name: str, supports: bool, spec: HeadSpec) -> None:
    """ConfigError when model.crop_fusion is set on a method it does not compose with."""
    if spec.crop_fusion != "none" and not supports:
        raise ConfigError(
            f"model.crop_fusion={spec.crop_fusion}: method {name!r} does not support crop "
            "fusion (it needs a method whose class decision is one head on pooled backbone "
            "features, such as baseline); leave model.crop_fusion=none"
        )


def check_meta_use(name: str, accepts_meta: bool, spec: HeadSpec, meta_keys: Sequence[str]) -> None:
    """ConfigError unless the declared metadata has a user (the method, or model.fusion) and
    the head options and fusion fit (a model never silently ignores its metadata)."""
    spec.check(meta_keys)
    if meta_keys and not accepts_meta and spec.fusion == "none":
        raise ConfigError(
            f"data.meta_keys: method {name!r} does not use metadata itself; set model.fusion="
            "add|concat|gate to join it to the class heads, or leave data.meta_keys empty"
        )


MethodType = type[Method]
METHODS: dict[str, MethodType] = {}


def register_method(cls: MethodType) -> MethodType:
    """Class decorator: make a method selectable with `method.name=<cls.name>`."""
    METHODS[cls.name] = cls
    REGISTERED_OPTIONS[cls.name] = cls.Options  # for the config check, which imports no method
    return cls


def method_class(name: str, module: str | None = None) -> MethodType:
    """The registered Method class called `name`, importing `module` first if given."""
    from lookcloser.methods import _import_builtin_methods

    _import_builtin_methods()
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"method.module: cannot import {module!r}: {err}") from None
    if name not in METHODS:
        _load_entry_point(name)
    if name not in METHODS:
        raise unknown_method(name, METHODS, module)
    return METHODS[name]


def _load_entry_point(name: str) -> None:
    """Load the `lookcloser.methods` entry point called `name` (a module or a Method class)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name != name:
            continue
        try:
            loaded = ep.load()  # importing the module registers its methods
        except ImportError as err:
            raise ConfigError(
                f"method.name: entry point {name!r} ({ep.value}) cannot be imported: {err}"
            ) from None
        if isinstance(loaded, type) and issubclass(loaded, Method) and name not in METHODS:
            METHODS[name] = loaded
        return
