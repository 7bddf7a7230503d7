"""Attention plug-ins for any timm CNN: SE, SK or CBAM blocks after its stages
(`model.attention`), and a spatial transformer in front of it (`model.stn`).

The blocks are timm's own layers (`SEModule`, `SelectiveKernel`, `CbamModule`). Each sits
behind a gate, `x + gamma * (block(x) - x)` with gamma = 0 at the start by default
(ReZero-style), so a pretrained network computes exactly what it computed before at step 0
and the block fades in as gamma learns; gamma = 1 is the block as published
(`model.attention_gate_init` sets the start). The blocks live
under one new prefix of the timm model (`attention_blocks.<level>.`), run as forward hooks on
the stage modules (every forward path of the model, `forward_intermediates` included, goes
through them), and are declared new so pretrained weights load around them.

A stage is one of the model's feature levels (timm's `feature_info`: the indices
`Backbone.intermediates` takes). By default every level from stride 4 on gets a block: the
stride-2 level (a ResNet's stem, an EfficientNet's first 16-channel stage) has the most
pixels to pay for and little to weigh.

The spatial transformer (Jaderberg et al., 2015) warps the input image before the network
sees it: a small localisation CNN on a 64 x 64 copy of the image predicts the transform
(affine: 6 numbers; similarity: log-scale, angle, shift; translation_scale: log-scale and
shift), its last layer starting at zero weights with the identity as bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import SelectiveKernel, SEModule
from timm.layers.cbam import CbamModule
from torch import Tensor, nn

from lookcloser.errors import ConfigError

AttentionKind = Literal["none", "se", "sk", "cbam"]
StnMode = Literal["affine", "similarity", "translation_scale"]
ATTENTION_KINDS = ("se", "sk", "cbam")
PLUGIN_ATTRIBUTE = "attention_blocks"
PLUGIN_PREFIX = f"{PLUGIN_ATTRIBUTE}."


# ---- stages ---------------------------------------------------------------------------------------
def is_token_model(model: nn.Module) -> bool:
    """Whether a timm model's features are tokens or NHWC maps (ViT, Swin, ...), not NCHW maps."""
    nhwc = getattr(model, "output_fmt", "NCHW") != "NCHW"
    return nhwc or hasattr(model, "patch_embed") or hasattr(model, "num_prefix_tokens")


def feature_levels(model: nn.Module, name: str = "") -> list[dict]:
    """The model's feature levels (timm feature_info: module, num_chs, reduction)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        raise ConfigError(f"model.attention: timm's {name!r} lists no feature levels (stages)")
    return info


def describe_levels(levels: Sequence[dict]) -> str:
    """'0: layer1 (64 ch, stride 4), ...' for error messages."""
    return ", ".join(
        f"{i}: {lv['module']} ({lv['num_chs']} ch, stride {lv['reduction']})"
        for i, lv in enumerate(levels)
    )


def resolve_stages(levels: Sequence[dict], stages: Sequence[int], name: str = "") -> list[int]:
    """Sorted level indices: `stages` (negative ones count from the end), or by default every
    level from stride 4 on."""
    if not stages:
        return [i for i, level in enumerate(levels) if level["reduction"] >= 4]
    chosen = set()
    for stage in stages:
        if not -len(levels) <= stage < len(levels):
            raise ConfigError(
                f"model.attention_stages: {stage} is not a stage of {name!r}; its stages are "
                f"{describe_levels(levels)}"
            )
        chosen.add(stage % len(levels))
    return sorted(chosen)


# ---- the blocks -----------------------------------------------------------------------------------
def sk_groups(in_channels: int, out_channels: int, limit: int = 32) -> int:
    """Groups of SK's 3x3 branch convs: up to SKNet's 32, dividing both channel counts."""
    return math.gcd(math.gcd(in_channels, out_channels), limit)


def make_block(kind: str, channels: int, reduction: int) -> nn.Module:
    """timm's SE, SK or CBAM block for a C-channel map (shape kept)."""
    ratio = 1.0 / reduction
    if kind == "se":
        return SEModule(channels, rd_ratio=ratio)
    if kind == "cbam":
        return CbamModule(channels, rd_ratio=ratio)
    if kind == "sk":
        # Two branches, 3x3 and 3x3 with dilation 2 (SKNet's 3x3 and 5x5), each on half the
        # input channels when they split evenly; grouped as SKNet's (up to 32 groups).
        split = channels % 2 == 0
        groups = sk_groups(channels // 2 if split else channels, channels)
        return SelectiveKernel(
            channels, channels, kernel_size=[3, 5], rd_ratio=ratio, split_input=split, groups=groups
        )
    raise ConfigError(f"model.attention: expected one of none, {', '.join(ATTENTION_KINDS)}")


class StageAttention(nn.Module):
    """One plug-in block after a stage: x + gamma * (block(x) - x), gamma starting at `gate`
    (0: the identity)."""

    def __init__(
        self, kind: str, channels: int, reduction: int, level: int, module: str, gate: float = 0.0
    ):
        super().__init__()
        self.kind = kind
        self.channels = channels
        self.level = level
        self.module_name = module
        self.block = make_block(kind, channels, reduction)
        self.gamma = nn.Parameter(torch.full((1,), float(gate)))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ConfigError(
                f"model.attention: stage {self.module_name} gives {tuple(x.shape)}, not the "
                f"B x {self.channels} x h x w map its block expects"
            )
        return x + self.gamma * (self.block(x) - x)

    def after_stage(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the stage module: its output goes through the block."""
        return self(output)

    def gates(self) -> dict[str, nn.Module]:
        """The modules whose outputs are the block's weights, by kind of weight:
        `channel` (B x C x 1 x 1), `spatial` (B x 1 x h x w), `branches` (B x 2 x C x 1 x 1)."""
        if self.kind == "se":
            return {"channel": self.block.gate}
        if self.kind == "cbam":
            return {"channel": self.block.channel.gate, "spatial": self.block.spatial.gate}
        return {"branches": self.block.attn}


def insert_attention(
    model: nn.Module,
    kind: str,
    stages: Sequence[int] = (),
    reduction: int = 16,
    name: str = "",
    gate: float = 0.0,
) -> None:
    """Add a `kind` block after each chosen stage of a timm CNN (a `create_timm_model` edit).

    The blocks go to `model.attention_blocks[<level>]`; each runs as a forward hook on its
    stage module. Token models (ViT, Swin) are refused with a ConfigError.
    """
    if kind not in ATTENTION_KINDS:
        raise ConfigError(f"model.attention: expected one of none, {', '.join(ATTENTION_KINDS)}")
    if is_token_model(model):
        raise ConfigError(
            f"model.attention={kind}: {name!r} is a transformer (token features); SE, SK and "
            "CBAM blocks need a CNN's B x C x h x w stage maps. Use a CNN backbone or "
            "model.attention=none (model.stn works with any backbone)"
        )
    levels = feature_levels(model, name)
    blocks = nn.ModuleDict()
    for level in resolve_stages(levels, stages, name):
        info = levels[level]
        block = StageAttention(kind, info["num_chs"], reduction, level, info["module"], gate)
        model.get_submodule(info["module"]).register_forward_hook(block.after_stage)
        blocks[str(level)] = block
    if not blocks:
        raise ConfigError(
            f"model.attention_stages: no stage chosen on {name!r}; its stages are "
            f"{describe_levels(levels)}"
        )
    setattr(model, PLUGIN_ATTRIBUTE, blocks)


def prune_attention_blocks(model: nn.Module) -> None:
    """Drop the blocks whose stage is gone (after timm's `prune_intermediate_layers`: the
    stage module removed or replaced), so no parameter is left that nothing uses."""
    blocks = getattr(model, PLUGIN_ATTRIBUTE, None)
    if blocks is None:
        return
    for key, block in list(blocks.items()):
        try:
            stage = model.get_submodule(block.module_name)
        except AttributeError:
            stage = None
        hooks = stage._forward_hooks.values() if stage is not None else ()
        if not any(getattr(hook, "__self__", None) is block for hook in hooks):
            del blocks[key]


def attention_blocks(model: nn.Module) -> list[StageAttention]:
    """The plug-in blocks of a timm model, in stage order (none without model.attention)."""
    blocks = getattr(model, PLUGIN_ATTRIBUTE, None)
    return list(blocks.values()) if blocks is not None else []


# ---- the spatial transformer ------------------------------------------------------------------------
STN_PARAMETERS = {"affine": 6, "similarity": 4, "translation_scale": 3}


def stn_theta(params: Tensor, mode: str) -> Tensor:
    """B x 2 x 3 affine matrices (in grid_sample's [-1, 1] coordinates) from the localisation
    net's outputs; zeros (and the identity bias of `affine`) give the identity."""
    if mode == "affine":
        return params.view(-1, 2, 3)
    scale = torch.exp(params[:, 0])
    zero = torch.zeros_like(scale)
    if mode == "similarity":
        angle, tx, ty = params[:, 1], params[:, 2], params[:, 3]
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        rows = [cos, -sin, tx, sin, cos, ty]
    elif mode == "translation_scale":
        tx, ty = params[:, 1], params[:, 2]
        rows = [scale, zero, tx, zero, scale, ty]
    else:
        raise ConfigError(f"model.stn_mode: expected one of {', '.join(STN_PARAMETERS)}")
    return torch.stack(rows, dim=1).view(-1, 2, 3)


def affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """B x H x W x 2 sampling grid of `theta` at the output pixel centres (as
    `F.affine_grid(..., align_corners=False)`, written with a matmul so it exports to ONNX
    opsets without AffineGrid)."""
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) + 0.5) * (2.0 / height) - 1
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) + 0.5) * (2.0 / width) - 1
    base = torch.stack(
        [
            xs[None, :].expand(height, -1),
            ys[:, None].expand(-1, width),
            torch.ones_like(ys)[:, None].expand(-1, width),
        ],
        dim=-1,
    )  # H x W x 3
    return (base.reshape(1, -1, 3) @ theta.transpose(1, 2)).view(-1, height, width, 2)


class SpatialTransformer(nn.Module):
    """Localisation CNN -> transform parameters -> grid -> bilinear sampler on the input.

    The localisation net sees a `size` x `size` copy of the image: by default a small CNN from
    scratch reading the normalized image; or `localisation`, a given network with
    `num_features` (e.g. a pretrained Backbone, which normalizes [0, 1] images itself). The
    output is `view_size` square when given: views sampled from a larger input (the STN
    paper's zoom headroom, 448 px in and 224 px views), not just resampled pixels. The
    last layer starts with zero weights and the identity as bias, so at step 0 the warp is the
    identity (the input comes back unchanged).
    """

    def __init__(
        self,
        mode: str = "affine",
        size: int = 64,
        channels: int = 32,
        localisation: nn.Module | None = None,
        view_size: int = 0,
    ):
        super().__init__()
        if mode not in STN_PARAMETERS:
            raise ConfigError(f"model.stn_mode: expected one of {', '.join(STN_PARAMETERS)}")
        self.mode = mode
        self.size = size
        self.view_size = view_size
        c = channels
        self.localisation = localisation
        if localisation is None:
            self.features = nn.Sequential(
                nn.Conv2d(3, c // 2, 5, stride=2, padding=2),
                nn.ReLU(),
                nn.Conv2d(c // 2, c, 5, stride=2, padding=2),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(c, c),
                nn.ReLU(),
            )
        else:
            c = localisation.num_features
        self.regress = nn.Linear(c, STN_PARAMETERS[mode])
        nn.init.zeros_(self.regress.weight)
        with torch.no_grad():
            self.regress.bias.zero_()
            if mode == "affine":
                self.regress.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def theta(self, images: Tensor, normalized: Tensor | None = None) -> Tensor:
        """B x 2 x 3 transforms for images (the scratch localisation net reads `normalized`
        if given; a given one reads the [0, 1] images)."""
        if self.localisation is not None:
            features = self.localisation(self._small(images))
        else:
            features = self.features(self._small(images if normalized is None else normalized))
        return stn_theta(self.regress(features), self.mode)

    def _small(self, images: Tensor) -> Tensor:
        return F.interpolate(
            images, size=(self.size, self.size), mode="bilinear", align_corners=False
        )

    def forward(self, images: Tensor, normalized: Tensor | None = None) -> Tensor:
        """The warped images (`view_size` square, else the input's size; zeros where the
        transform looks outside the image)."""
        theta = self.theta(images, normalized)
        height, width = (self.view_size,) * 2 if self.view_size else images.shape[-2:]
        grid = affine_grid(theta, height, width)
        return F.grid_sample(
            images,
            grid.to(images.dtype),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
