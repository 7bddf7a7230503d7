"""The options of the built-in methods (`method.<option>` keys), apart from the methods'
networks: the config is checked against them before torch, timm or Lightning is imported,
so a typo in `method.*` is reported in well under a second. Each method module takes its
`Options` from here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar, Literal

from lookcloser.config import ranged
from lookcloser.errors import ConfigError

ENTRY_POINT_GROUP = "lookcloser.methods"  # methods installed by other packages


@dataclass
class BaselineOptions:
    """Options of the baseline method."""

    label_smoothing: float = ranged(0.1, 0, 1, high_open=True)

    HELP: ClassVar[dict[str, str]] = {"label_smoothing": "label smoothing of the cross-entropy"}


@dataclass
class DCLOptions:
    """Options of DCL; defaults are the paper's (CUB-200-2011 with ResNet-50 at 448 px)."""

    # N: the image is cut into N x N regions (1 = no destruction: the baseline).
    regions: int = 7
    # k: a region moves by less than 2k along each axis (0 = no destruction).
    neighbourhood: int = 2
    # Destroyed images per original in a batch (1.0 = the paper's 1:1; 0.5 = one for every
    # second original; 2.0 = two differently destroyed copies of each original).
    destroy_ratio: float = 1.0
    alpha: float = 1.0  # weight of the classification loss
    beta: float = 1.0  # weight of the adversarial loss
    gamma: float = 1.0  # weight of the alignment loss (paper: 0.01 for cars and aircraft)
    adversarial_head: Literal["binary", "class_pairs"] = "binary"
    alignment: Literal["coords", "index"] = "coords"
    label_smoothing: float = 0.0  # on the classification loss only

    HELP: ClassVar[dict[str, str]] = {
        "regions": "N: images are cut into N x N regions (1 = no destruction)",
        "neighbourhood": "k: a region moves by less than 2k along each axis",
        "destroy_ratio": "destroyed images per original in a batch",
        "alpha": "weight of the classification loss",
        "beta": "weight of the adversarial (original vs destroyed) loss",
        "gamma": "weight of the region-alignment loss (paper: 0.01 for cars and aircraft)",
        "adversarial_head": "binary (paper) or class_pairs (released code)",
        "alignment": "coords (paper: row, col) or index (released code: flattened index)",
        "label_smoothing": "label smoothing of the classification loss",
    }

    def __post_init__(self) -> None:
        if self.regions < 1:
            raise ConfigError(f"method.regions: expected an integer >= 1, got {self.regions}")
        if self.neighbourhood < 0:
            raise ConfigError(
                f"method.neighbourhood: expected an integer >= 0, got {self.neighbourhood}"
            )
        if self.destroy_ratio < 0:
            raise ConfigError(
                f"method.destroy_ratio: expected destroyed images per original >= 0, "
                f"got {self.destroy_ratio}"
            )
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"method.{name}: expected a weight >= 0, got {getattr(self, name)}"
                )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"method.label_smoothing: expected a value in [0, 1), got {self.label_smoothing}"
            )
        if self.adversarial_head not in ("binary", "class_pairs"):
            raise ConfigError(
                f"method.adversarial_head: expected 'binary' or 'class_pairs', "
                f"got {self.adversarial_head!r}"
            )
        if self.alignment not in ("coords", "index"):
            raise ConfigError(
                f"method.alignment: expected 'coords' or 'index', got {self.alignment!r}"
            )


@dataclass
class TASNOptions:
    """Options of TASN; defaults follow the released code (CUB-200-2011, ResNet-50)."""

    attention_backbone: str = "resnet18"
    # 8 gives the paper's 28 x 28 maps at 224 px on a ResNet (0: the backbone's own stride).
    attention_output_stride: int = ranged(8, 0, 32)
    attention_stage: int = ranged(-1, -1, 16)
    attention_channels: int = ranged(512, 0, 4096)
    normalisation: Literal["none", "spatial", "spatial_relation"] = "spatial_relation"
    softmax_scale: float = ranged(7.0, 0, 1000, low_open=True)
    input_size: int = ranged(0, 0, 4096)
    max_zoom: float = ranged(4.0, 1, 64)
    sampler_iterations: int = ranged(5, 0, 50)
    structure_power: float = ranged(2.0, 0, 8, low_open=True)
    share_fc: bool = False
    temperature: float = ranged(10.0, 0, 100, low_open=True)
    distill_weight: float = ranged(1.0, 0, 100)
    part_weight: float = ranged(1.0, 0, 100)
    attention_weight: float = ranged(1.0, 0, 100)
    label_smoothing: float = ranged(0.0, 0, 1, high_open=True)

    HELP: ClassVar[dict[str, str]] = {
        "attention_backbone": "timm CNN of the attention network (paper: ResNet-18)",
        "attention_output_stride": "output_stride of the attention CNN (8: 28x28 maps at "
        "224 px, as the paper's dilated ResNet-18; 0: the CNN's own stride)",
        "attention_stage": "take the attention CNN's map from this stage (-1: its last; its "
        "later stages are dropped), a cheaper way to a high-resolution map",
        "attention_channels": "channels of the dilated conv groups after the attention CNN "
        "(released code: 512; 0: none)",
        "normalisation": "none, spatial or spatial_relation (paper's ablation; default the "
        "paper's N(N(X)X^T)X)",
        "softmax_scale": "X is multiplied by this inside the spatial softmax (released: 7)",
        "input_size": "size of the images the model takes (paper: 512); the sampler makes "
        "data.image_size images from them (0: data.image_size, no zoom headroom)",
        "max_zoom": "largest zoom the sampler gives any row or column (released: 4)",
        "sampler_iterations": "cap-and-spread iterations on the marginals (released: 5)",
        "structure_power": "the structure map is raised to this power (released code: 2; "
        "the paper's plain channel mean: 1)",
        "share_fc": "part-net and master-net share the classifier too (they always share "
        "the conv weights)",
        "temperature": "distillation temperature T (released: 10)",
        "distill_weight": "lambda: weight of the soft-target cross-entropy (released: 1)",
        "part_weight": "weight of the part-net's cross-entropy",
        "attention_weight": "weight of the attention network's own classification loss "
        "(released code trains the attention net with it)",
        "label_smoothing": "label smoothing of the cross-entropy losses",
    }

    def __post_init__(self) -> None:
        if not self.attention_backbone:
            raise ConfigError("method.attention_backbone: expected a timm model name")


@dataclass
class RAMSTransOptions:
    """Options of RAMS-Trans; defaults follow the paper (ViT-B/16, best ablation)."""

    scales: int = ranged(2, 2, 3)
    alpha: float = ranged(1.3, 0, 100)
    third_alpha: float = ranged(0.0, 0, 100)
    importance: Literal["auto", "rollout", "cam"] = "auto"
    rollout_query: Literal["cls", "mean"] = "cls"
    predict_from: Literal["sum", "last"] = "sum"
    zoom_loss_weight: float = ranged(1.0, 0, 100)
    label_smoothing: float = ranged(0.0, 0, 1, high_open=True)

    HELP: ClassVar[dict[str, str]] = {
        "scales": "how many times the network looks: 2 (the paper: image, then one zoom) "
        "or 3 (a second zoom into the first zoom's crop)",
        "alpha": "DPPM threshold: patches above alpha x the mean importance are kept "
        "(paper's best ablation: 1.3; released code: 1.2)",
        "third_alpha": "the threshold for the third scale's box (0: alpha; released "
        "code's optional third scale: 1.3)",
        "importance": "patch importance: rollout (attention rollout of a ViT, the paper), "
        "cam (class activation map of a CNN's last feature map; beyond the paper) or auto "
        "(rollout on a ViT, cam otherwise)",
        "rollout_query": "rollout row read as importance: cls (the class token's row, the "
        "paper) or mean (the mean over all query rows, the released code)",
        "predict_from": "prediction: sum (the scales' summed logits, the paper) or last "
        "(the most zoomed scale's logits)",
        "zoom_loss_weight": "weight of the cross-entropy of every zoomed scale (the paper: "
        "1; the released trainer optimises the first scale's loss alone: 0)",
        "label_smoothing": "label smoothing of the cross-entropy losses",
    }


@dataclass
class DCNOptions:
    """Options of DCN; the paper's networks are for 60-100 px digits, so sizes are ours."""

    coarse_backbone: str = ""
    coarse_scale: float = ranged(0.5, 0, 1, low_open=True)
    coarse_stage: int = ranged(-1, -1, 16)
    patch_size: int = ranged(32, 8, 1024)
    glimpses: int = ranged(4, 1, 4096)
    top_channels: int = ranged(512, 1, 8192)
    hint_weight: float = ranged(1.0, 0, 100)
    coarse_weight: float = ranged(0.0, 0, 100)
    label_smoothing: float = ranged(0.0, 0, 1, high_open=True)

    HELP: ClassVar[dict[str, str]] = {
        "coarse_backbone": "timm CNN of the coarse network ('' = model.backbone's "
        "architecture, its own weights)",
        "coarse_scale": "the coarse network sees the image resized by this factor",
        "coarse_stage": "take the coarse network's map from this stage (-1: its last; later "
        "stages are dropped): a cheaper, finer map",
        "patch_size": "side in pixels of the cells the input is cut into; the fine network "
        "sees the chosen cells at full resolution (must divide data.image_size)",
        "glimpses": "k: cells the fine network looks at (the paper's top-k salient patches)",
        "top_channels": "width of the shared top layers g (a per-cell linear + ReLU before "
        "the mean and the class head)",
        "hint_weight": "weight of the hint term (coarse vectors pulled to the fine ones at "
        "the chosen cells; trains the coarse path only)",
        "coarse_weight": "weight of a cross-entropy on the coarse prediction (beyond the "
        "paper, which trains the coarse path through the refined prediction and the hints: 0)",
        "label_smoothing": "label smoothing of the cross-entropy losses",
    }


@dataclass
class RACNNOptions:
    """Options of RA-CNN; where the paper gives no number (step counts, APN sizes), ours."""

    scales: int = ranged(3, 2, 3)
    margin: float = ranged(0.05, 0, 1)
    sharpness: float = ranged(10.0, 0, 1000, low_open=True)
    min_crop: float = ranged(1 / 3, 0.05, 1)
    response_crop: float = ranged(0.5, 0.05, 1)
    apn_channels: int = ranged(64, 1, 4096)
    apn_grid: int = ranged(7, 1, 64)
    apn_hidden: int = ranged(512, 1, 8192)
    apn_pretrain_steps: int = ranged(200, 0)
    apn_pretrain_weight: float = ranged(1.0, 0, 1000)
    cls_steps: int = ranged(200, 1)
    apn_steps: int = ranged(100, 1)
    apn_lr_scale: float | None = None
    predict_from: Literal["fusion", "sum", "last"] = "fusion"
    label_smoothing: float = ranged(0.0, 0, 1, high_open=True)

    HELP: ClassVar[dict[str, str]] = {
        "scales": "how many scales (networks) look: 2 or 3 (the paper: 3)",
        "margin": "margin of the pairwise ranking loss (the paper: 0.05)",
        "sharpness": "k: slope of the boxcar mask's logistic edges, per pixel (large k: a "
        "hard crop)",
        "min_crop": "smallest square side, as a share of the scale's input side (ours)",
        "response_crop": "side of the highest-response square the APN is pretrained on, as a "
        "share of the input side (the paper: half)",
        "apn_channels": "channels of the APN's 1x1 conv before its fully connected layers",
        "apn_grid": "the APN resizes its map to this grid before flattening (fixed size for "
        "any backbone and input)",
        "apn_hidden": "width of the APN's first fully connected layer",
        "apn_pretrain_steps": "first training steps: each APN regresses onto its scale's "
        "highest-response square (the paper's APN initialisation; 0: none)",
        "apn_pretrain_weight": "weight of that regression during the APN pretraining",
        "cls_steps": "steps of each classification phase (APNs fixed)",
        "apn_steps": "steps of each proposal phase (ranking loss; classifiers fixed)",
        "apn_lr_scale": "the APNs' learning rate as a multiple of optim.lr (null: the new "
        "modules' optim.head_lr_scale)",
        "predict_from": "prediction: fusion (normalised scale features concatenated, one "
        "linear layer: the paper), sum (the scales' summed logits) or last (finest scale)",
        "label_smoothing": "label smoothing of the cross-entropy losses",
    }

    def __post_init__(self) -> None:
        if self.apn_lr_scale is not None and not self.apn_lr_scale > 0:
            raise ConfigError(f"method.apn_lr_scale: expected > 0 or null, got {self.apn_lr_scale}")
        if self.response_crop < self.min_crop:
            raise ConfigError(
                f"method.response_crop={self.response_crop:g} is below method.min_crop="
                f"{self.min_crop:g}: the APN could not propose its pretraining squares"
            )


# method.name -> its options, for the built-in methods.
BUILTIN_OPTIONS: dict[str, type] = {
    "baseline": BaselineOptions,
    "dcl": DCLOptions,
    "tasn": TASNOptions,
    "ramstrans": RAMSTransOptions,
    "dcn": DCNOptions,
    "racnn": RACNNOptions,
}


def unknown_method(name: str, known: Iterable[str], module: str | None = None) -> ConfigError:
    """The error for a `method.name` that is neither `known` nor an installed entry point."""
    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    available = ", ".join(sorted(set(known) | plugins))
    where = f" (after importing {module!r})" if module else ""
    return ConfigError(
        f"method.name: unknown method {name!r}{where}; available: {available}; "
        "a method defined elsewhere needs method.module=<its module>"
    )


# Options of every method registered in this process so far (`methods.base.register_method`),
# a method a notebook or a test defines included.
REGISTERED_OPTIONS: dict[str, type] = {}


def options_type(name: str, module: str | None) -> type | None:
    """The options of a built-in or already registered method without importing any (None:
    a method from `module` or an entry point, whose own module declares them); ConfigError
    for a name that is none of these."""
    if module:
        return None
    if name in REGISTERED_OPTIONS:
        return REGISTERED_OPTIONS[name]
    if name in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[name]
    if any(ep.name == name for ep in entry_points(group=ENTRY_POINT_GROUP)):
        return None
    raise unknown_method(name, {**BUILTIN_OPTIONS, **REGISTERED_OPTIONS})
