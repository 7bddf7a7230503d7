"""Class heads: a registry of pooled embedding -> logits layers (`model.head=<name>`).

Every method builds its class heads here, so a head type (cosine, ArcFace, ...) registered
once works with every method. Heads that are not class decision layers (DCL's adversary,
TASN's part heads) are the method's own business.

Margin heads (ArcFace, sub-centre ArcFace) differ from a cosine classifier only in training:
their registered `margin` function turns the head's logits and the targets into the logits
the loss sees (`Method.class_loss`), so every method gets the margin without code of its own,
and inference, ECE and ONNX use the plain scaled cosine logits.

`HeadSpec` is what `model.*` says about class heads (type, options, metadata fusion); a
Method builds each head with `HeadSpec.build`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.errors import ConfigError
from lookcloser.models.crops import CropFusedHead
from lookcloser.models.fusion import FusedHead, MetaEncoder, MetaFusion

HeadFactory = Callable[..., nn.Module]
MarginFn = Callable[..., Tensor]
HEADS: dict[str, HeadFactory] = {}
# Head name -> fn(logits, targets, **options): the logits the training loss sees.
MARGINS: dict[str, MarginFn] = {}
# Config keys (model.head_<option>) handed to the heads whose factory names them.
HEAD_OPTIONS = ("scale", "margin", "subcenters")
# Defaults of the cosine heads and their margin (one value each: the margin function must
# divide the logits by the head's own scale).
DEFAULT_SCALE = 30.0
DEFAULT_MARGIN = 0.3  # radians


def register_head(
    name: str, margin: MarginFn | None = None
) -> Callable[[HeadFactory], HeadFactory]:
    """Register `fn(in_features, num_classes, **options) -> nn.Module` as `model.head=<name>`.

    Options named in HEAD_OPTIONS come from `model.head_<option>`. `margin`, for heads that
    train with one, is `fn(logits, targets, **options) -> logits` applied before the loss.
    """

    def wrap(fn: HeadFactory) -> HeadFactory:
        HEADS[name] = fn
        if margin is not None:
            MARGINS[name] = margin
        else:
            MARGINS.pop(name, None)
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


def _accepted(fn: Callable, names: Sequence[str]) -> set[str]:
    params = inspect.signature(fn).parameters
    return {n for n in names if n in params}


# ---- heads --------------------------------------------------------------------------------------
@register_head("linear")
def linear_head(in_features: int, num_classes: int, bias: bool = True) -> nn.Module:
    """A plain linear classifier."""
    return nn.Linear(in_features, num_classes, bias=bias)


class CosineHead(nn.Module):
    """Logits = scale x cos(angle between the embedding and each class weight).

    With `subcenters` K > 1 each class has K weight vectors and its cosine is the largest of
    them (sub-centre ArcFace: noisy or multi-modal classes take several centres).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float, subcenters: int = 1):
        super().__init__()
        if subcenters < 1:
            raise ConfigError(f"model.head_subcenters: expected 1 or more, got {subcenters}")
        self.scale = float(scale)
        self.subcenters = int(subcenters)
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosines(self, x: Tensor) -> Tensor:
        """... x classes cosines (the largest over each class's sub-centres)."""
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        if self.subcenters == 1:
            return cos
        return cos.unflatten(-1, (self.num_classes, self.subcenters)).amax(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.cosines(x)

    def input_gradient(self, x: Tensor, grad: Tensor) -> Tensor:
        """d(sum grad * logits)/dx in closed form (B x D), for methods that need it inside an
        exported graph (DCN's saliency): with x^ = x / |x| and w the chosen unit weights,
        d(s cos_k)/dx = s (w_k - cos_k x^) / |x|."""
        norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = x / norm
        weights = F.normalize(self.weight, dim=-1)
        if self.subcenters == 1:
            pulled = grad @ weights  # B x D
        else:
            cos = (unit @ weights.t()).unflatten(-1, (self.num_classes, self.subcenters))
            chosen = F.one_hot(cos.argmax(-1), self.subcenters).to(grad.dtype)  # B x C x K
            pulled = (grad[..., None] * chosen).flatten(-2) @ weights
        along = (pulled * unit).sum(-1, keepdim=True)
        return self.scale * (pulled - along * unit) / norm

    def extra_repr(self) -> str:
        d = self.weight.shape[1]
        return f"{d} -> {self.num_classes}, scale={self.scale:g}, subcenters={self.subcenters}"


def additive_angular_margin(
    logits: Tensor, targets: Tensor, scale: float = DEFAULT_SCALE, margin: float = DEFAULT_MARGIN
) -> Tensor:
    """ArcFace's training logits: the target class's s cos(theta) becomes s cos(theta + m).

    `logits` are a cosine head's (s cos theta); m is in radians. Written here rather than
    taken from pytorch-metric-learning, whose ArcFaceLoss owns its class weights (and takes
    degrees): here the weights stay the method's head, so inference and export are a plain
    cosine classifier. Past theta = pi - m, cos(theta + m) would rise again; there the logit
    is cos(theta) - (1 - cos m), which meets cos(pi) at the boundary and keeps falling.
    Class probabilities as targets (mixup) get the margin in proportion to each class's share.
    """
    cos = (logits.float() / scale).clamp(-1.0, 1.0)
    sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
    shifted = cos * math.cos(margin) - sin * math.sin(margin)  # cos(theta + m)
    shifted = torch.where(cos > math.cos(math.pi - margin), shifted, cos - (1 - math.cos(margin)))
    share = (
        F.one_hot(targets, cos.shape[-1]).to(cos.dtype) if targets.ndim == 1 else targets.float()
    )
    return (scale * (cos + share * (shifted - cos))).to(logits.dtype)


@register_head("cosine")
def cosine_head(in_features: int, num_classes: int, scale: float = DEFAULT_SCALE) -> nn.Module:
    """Normalised embeddings and class weights: scale x cosine similarity."""
    return CosineHead(in_features, num_classes, scale)


@register_head("arcface", margin=additive_angular_margin)
def arcface_head(
    in_features: int, num_classes: int, scale: float = DEFAULT_SCALE, margin: float = DEFAULT_MARGIN
) -> nn.Module:
    """ArcFace: a cosine head trained with an additive angular margin on the target class."""
    del margin  # used by the loss (additive_angular_margin), not by the layer
    return CosineHead(in_features, num_classes, scale)


@register_head("subcenter_arcface", margin=additive_angular_margin)
def subcenter_arcface_head(
    in_features: int,
    num_classes: int,
    scale: float = DEFAULT_SCALE,
    margin: float = DEFAULT_MARGIN,
    subcenters: int = 3,
) -> nn.Module:
    """Sub-centre ArcFace: K centres per class, the closest one counts, trained with the margin."""
    del margin
    return CosineHead(in_features, num_classes, scale, subcenters)


# ---- what model.* says about class heads ----------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """The class head type, its options and what is fused in front of it (metadata, and
    the object crop's features with `crop_fusion`).

    Options left as None take the head's own defaults; one the head does not take is a
    ConfigError (model.head_margin with model.head=linear, say).
    """

    name: str = "linear"
    scale: float | None = None
    margin: float | None = None
    subcenters: int | None = None
    fusion: str = "none"  # none | add | concat | gate (models.fusion)
    meta_hidden: int = 256
    meta_dropout: float = 0.1
    crop_fusion: str = "none"  # none | concat | add (models.crops): image and crop features
    crop_alpha: float = 1.0  # attention boxes: cells above crop_alpha x the mean importance

    @classmethod
    def from_config(cls, model: Any) -> HeadSpec:
        """The spec of a `ModelConfig` (model.head, model.head_*, model.fusion, model.meta_*)."""
        return cls(
            model.head,
            model.head_scale,
            model.head_margin,
            model.head_subcenters,
            model.fusion,
            model.meta_hidden,
            model.meta_dropout,
            model.crop_fusion,
            model.crop_alpha,
        )

    def options(self) -> dict[str, Any]:
        """The options handed to the head's factory; ConfigError for one it does not take."""
        factory = head_factory(self.name)
        given = {n: getattr(self, n) for n in HEAD_OPTIONS if getattr(self, n) is not None}
        accepted = _accepted(factory, HEAD_OPTIONS)
        for option in given:
            if option not in accepted:
                takers = sorted(n for n, f in HEADS.items() if option in _accepted(f, HEAD_OPTIONS))
                raise ConfigError(
                    f"model.head_{option}: model.head={self.name} has no {option}; heads that "
                    f"take it: {', '.join(takers) or 'none'}"
                )
        return given

    def check(self, meta_keys: Sequence[str]) -> None:
        """ConfigError for options the head does not take or metadata fusion cannot use."""
        self.options()
        if self.fusion != "none":
            if not meta_keys:
                raise ConfigError(
                    f"model.fusion={self.fusion}: no metadata to fuse; declare it in "
                    "data.meta_keys (e.g. [latitude, longitude, day_of_year])"
                )
            MetaEncoder(meta_keys)

    def build(self, in_features: int, num_classes: int, meta_keys: Sequence[str] = ()) -> nn.Module:
        """A class head on `in_features` embeddings; with crop fusion, the image's and its
        crop's embeddings are joined first (models.crops), then the metadata (models.fusion)."""
        if self.crop_fusion != "none":
            width = 2 * in_features if self.crop_fusion == "concat" else in_features
            inner = replace(self, crop_fusion="none").build(width, num_classes, meta_keys)
            return CropFusedHead(self.crop_fusion, inner)
        options = self.options()
        if self.fusion == "none":
            return build_head(self.name, in_features, num_classes, **options)
        fusion = MetaFusion(
            meta_keys, in_features, self.fusion, hidden=self.meta_hidden, dropout=self.meta_dropout
        )
        classifier = build_head(self.name, fusion.out_features, num_classes, **options)
        return FusedHead(fusion, classifier)

    def training_logits(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The logits a training loss sees: the head's margin applied, if it has one."""
        margin = MARGINS.get(self.name)
        if margin is None:
            return logits
        given = {n: getattr(self, n) for n in HEAD_OPTIONS if getattr(self, n) is not None}
        accepted = _accepted(margin, HEAD_OPTIONS)
        return margin(logits, targets, **{k: v for k, v in given.items() if k in accepted})


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
                "model.head=prototype: expected model.head_subcenters >= 1 and model.head_scale "
                f"> 0, got {per_class} and {scale}"
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
    in_features: int, num_classes: int, scale: float = 16.0, subcenters: int = 3
) -> nn.Module:
    """Scaled cosine similarity to `subcenters` learned prototypes per class (PrototypeHead);
    model.head_scale and model.head_subcenters set them."""
    return PrototypeHead(in_features, num_classes, subcenters, scale)
