"""TASN: Trilinear Attention Sampling Network (Zheng et al., CVPR 2019).

Three parts around the configured backbone (the part-net / master-net):

* **Trilinear attention.** An attention network (its own timm CNN, `method.attention_backbone`,
  with a high-resolution map from `output_stride` or an earlier stage, then the released
  code's two groups of weight-shared dilated convs) gives X (c x hw);
  M(X) = N(N(X) X^T) X turns its channels into c attention maps. The attention network learns
  from its own classifier (released code); the maps reach nothing else with a gradient.
* **Attention sampler.** A map's max over x and over y gives two 1-D marginals; inverting their
  CDFs maps a uniform output grid to input coordinates, so attended regions get more output
  pixels (`grid_sample`, separable, batched). The channel mean of M gives the
  structure-preserved image, one random channel the detail-preserved image.
* **Distiller.** Part-net (detail image) and master-net (structure image) are one network;
  the master learns from labels and from the part-net's soft targets at temperature T.

Inference, export and serving run attention net -> structure sampler -> master-net, one graph.
Where a choice follows the released code rather than the paper, the option's HELP says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.explain.cam import normalize_maps
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import TASNOptions
from lookcloser.models.backbones import Backbone, BackboneFactory
from lookcloser.models.heads import HeadSpec
from lookcloser.models.modes import eval_mode
from lookcloser.models.plugins import prune_attention_blocks

Normalisation = Literal["none", "spatial", "spatial_relation"]


# ---- trilinear attention ------------------------------------------------------------------------
def spatial_softmax(features: Tensor, scale: float = 1.0) -> Tensor:
    """B x C x hw: each channel's softmax over space (of the features times `scale`)."""
    return torch.softmax(features.flatten(2) * scale, dim=-1)


def trilinear_attention(
    features: Tensor, normalisation: Normalisation = "spatial_relation", scale: float = 1.0
) -> Tensor:
    """Attention maps M(X) (B x C x h x w) of a feature map X (B x C x h x w).

    `spatial_relation` (the paper's choice): N(N(X) X^T) X; `spatial`: N(X) X^T X; `none`:
    X X^T X. N is a softmax over the second dimension; `scale` multiplies X inside the spatial
    softmax (released code: 7, "to obtain an appropriate scale for the softmax").
    """
    b, c, h, w = features.shape
    x = features.flatten(2)
    left = spatial_softmax(features, scale) if normalisation != "none" else x
    relation = left @ x.transpose(1, 2)  # B x C x C: how each channel relates to the others
    if normalisation == "spatial_relation":
        relation = torch.softmax(relation, dim=-1)
    return (relation @ x).view(b, c, h, w)


def unique_channels(maps: Tensor) -> Tensor:
    """B x C float mask: 1 for the first of each set of identical maps (equal sums), else 0.

    Dead feature channels all give the same map; the released code counts it once.
    Written with comparisons only, so it exports to ONNX.
    """
    sums = maps.flatten(2).sum(-1)
    same = (sums[:, :, None] == sums[:, None, :]).float()
    earlier = torch.ones(sums.shape[1], sums.shape[1], device=maps.device).tril(-1)
    return 1.0 - (same * earlier).amax(dim=-1)


def structure_map(maps: Tensor, power: float = 1.0) -> Tensor:
    """B x h x w: the mean of the distinct attention maps, raised to `power`."""
    keep = unique_channels(maps)
    mean = (maps * keep[:, :, None, None]).sum(1) / keep.sum(1)[:, None, None]
    return mean.clamp_min(0) ** power


def detail_map(maps: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """B x h x w: one distinct map drawn at random per sample, and the channels drawn (B,)."""
    keep = unique_channels(maps)
    channel = torch.multinomial(keep.cpu(), 1, generator=generator)[:, 0].to(maps.device)
    return maps[torch.arange(maps.shape[0], device=maps.device), channel], channel


# ---- attention sampler --------------------------------------------------------------------------
def warp_densities(
    marginal_x: Tensor, marginal_y: Tensor, max_zoom: float = 4.0, iterations: int = 5
) -> tuple[Tensor, Tensor]:
    """Output pixels per input pixel along x (B x W) and y (B x H); each has mean 1.

    As the released sampler: the marginals are scaled to mean 1, then `iterations` times
    capped (first at `max_zoom`, then at the smaller of the two axes' peaks, so both axes
    zoom alike) and the removed mass spread evenly, which keeps some of every region.
    """
    zx = marginal_x / marginal_x.mean(-1, keepdim=True).clamp_min(1e-12)
    zy = marginal_y / marginal_y.mean(-1, keepdim=True).clamp_min(1e-12)
    for step in range(iterations):
        cap = torch.minimum(zx.amax(-1, keepdim=True), zy.amax(-1, keepdim=True))
        if step == 0:
            cap = cap.clamp(max=max_zoom)
        zx, zy = torch.minimum(zx, cap), torch.minimum(zy, cap)
        zx = zx + (1 - zx.mean(-1, keepdim=True))
        zy = zy + (1 - zy.mean(-1, keepdim=True))
    return zx, zy


def inverse_cdf(density: Tensor, out: int) -> Tensor:
    """B x out grid coordinates in [-1, 1]: where each output pixel centre samples the input.

    `density` (B x n, positive) spreads the output pixels over the n input pixels; its CDF is
    linear inside each input pixel and inverted exactly (a uniform density gives a plain
    resize). The search is a comparison count rather than `searchsorted`, which ONNX lacks.
    """
    n = density.shape[-1]
    cdf = torch.cumsum(density, dim=-1)
    edges = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)  # B x (n + 1)
    centres = (torch.arange(out, device=density.device, dtype=density.dtype) + 0.5) / out
    targets = centres[None] * cdf[:, -1:]  # B x out, in (0, total)
    upper = (edges[:, None, :] < targets[:, :, None]).sum(-1).clamp(1, n)  # edge at or above
    low, high = edges.gather(1, upper - 1), edges.gather(1, upper)
    position = (upper - 1).to(density.dtype) + (targets - low) / (high - low).clamp_min(1e-12)
    return position * (2.0 / n) - 1.0


def sampling_grid(
    maps: Tensor,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    max_zoom: float = 4.0,
    iterations: int = 5,
) -> Tensor:
    """B x out_h x out_w x 2 grid for `grid_sample` from attention maps (B x h x w, >= 0)."""
    # Max, not sum, over the other axis (the paper: more robust), on the map itself; then each
    # 1-D marginal is resized to its input axis (the released code resizes the whole map to
    # the input first: 2-D work on 512 x 512 maps for the same curve up to interpolation).
    maps = maps.clamp_min(0)
    zx, zy = warp_densities(
        _resize_1d(maps.amax(dim=1), input_size[1]),
        _resize_1d(maps.amax(dim=2), input_size[0]),
        max_zoom,
        iterations,
    )
    gx, gy = inverse_cdf(zx, output_size[1]), inverse_cdf(zy, output_size[0])
    grid_x = gx[:, None, :].expand(-1, output_size[0], -1)
    grid_y = gy[:, :, None].expand(-1, -1, output_size[1])
    return torch.stack([grid_x, grid_y], dim=-1)


def _resize_1d(values: Tensor, size: int) -> Tensor:
    """B x n -> B x size by linear interpolation (pixel centres aligned, as bilinear resize)."""
    return F.interpolate(values[:, None], size=size, mode="linear", align_corners=False)[:, 0]


def attention_sample(
    images: Tensor,
    maps: Tensor,
    output_size: int | tuple[int, int],
    max_zoom: float = 4.0,
    iterations: int = 5,
) -> Tensor:
    """Images (B x 3 x H x W) resampled to `output_size`, zoomed where the maps are high."""
    out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    grid = sampling_grid(maps, images.shape[-2:], out, max_zoom, iterations)
    return F.grid_sample(images, grid.to(images.dtype), align_corners=False, padding_mode="border")


def soft_target_cross_entropy(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of -sum softmax(teacher / T) log softmax(student / T)."""
    targets = torch.softmax(teacher / temperature, dim=-1)
    return -(targets * torch.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


# ---- the attention network ----------------------------------------------------------------------
class DilatedAttentionHead(nn.Module):
    """The released code's attention head: two groups of weight-shared dilated 3x3 convs.

    Group 1: one conv at dilations 1 and 2, ReLU each, summed; group 2: one conv at dilations
    1, 2 and 3 on that, ReLU each, summed. Several receptive fields, one set of weights.
    """

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    @staticmethod
    def _dilated(conv: nn.Conv2d, x: Tensor, dilations: Sequence[int]) -> Tensor:
        return sum(
            F.relu(F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d)) for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._dilated(self.conv2, self._dilated(self.conv1, x, (1, 2)), (1, 2, 3))


class AttentionNet(nn.Module):
    """A timm CNN up to `stage` (-1: its last feature map), then the dilated head (if any)."""

    def __init__(self, backbone: Backbone, stage: int, channels: int):
        super().__init__()
        self.backbone = backbone
        self.stage = stage
        if stage >= 0:
            # Drop the stages after the one used: their compute and weights are never needed.
            backbone.model.prune_intermediate_layers([stage], prune_norm=True, prune_head=True)
            prune_attention_blocks(backbone.model)  # model.attention blocks of dropped stages
        # A dry run for the channel count, in eval mode: it must not touch BN statistics.
        with eval_mode(backbone), torch.no_grad():
            probe = torch.zeros(1, 3, 64, 64, device=backbone.mean.device)
            in_channels = self._trunk(probe).shape[1]
        self.head = DilatedAttentionHead(in_channels, channels) if channels else nn.Identity()
        self.channels = channels or in_channels

    def _trunk(self, images: Tensor) -> Tensor:
        if self.stage < 0:
            return self.backbone.spatial_map(self.backbone.forward_features(images))
        return self.backbone.intermediates(images, [self.stage])[0]

    def forward(self, images: Tensor) -> Tensor:
        """B x C x h x w features X of the trilinear attention."""
        return self.head(self._trunk(images))


# ---- the method -----------------------------------------------------------------------------------
@register_method
class TASN(Method):
    """Trilinear attention -> attention sampling -> part-to-master distillation."""

    name = "tasn"
    Options = TASNOptions
    training_only = ("part_head", "attention_classifier")

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: TASNOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
        attention_backbone: Backbone | None = None,
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        opts: TASNOptions = self.options
        if attention_backbone is None:
            raise ConfigError("method tasn: build it with TASN.build (it needs two networks)")
        self.attention_net = AttentionNet(
            attention_backbone, opts.attention_stage, opts.attention_channels
        )
        self.head = self.make_head(backbone.num_features)
        self.part_head = None if opts.share_fc else self.make_head(backbone.num_features)
        # Trains the attention network (released code): BN, ReLU, pool, linear on X.
        self.attention_classifier = nn.Sequential(
            nn.BatchNorm2d(self.attention_net.channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(self.attention_net.channels, num_classes),
        )

    @classmethod
    def build(
        cls,
        make_backbone: BackboneFactory,
        num_classes: int,
        options: TASNOptions,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ) -> TASN:
        """The part/master network from `model.*`, the attention network from `method.*`."""
        stride = options.attention_output_stride
        attention = make_backbone(
            options.attention_backbone,
            kwargs={"output_stride": stride} if stride else {},
            drop_rate=0.0,
            drop_path_rate=0.0,
        )
        return cls(make_backbone(), num_classes, options, head, meta_keys, attention)

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def input_size(self) -> int | None:
        """The images the model takes: method.input_size, else data.image_size."""
        return self.options.input_size or self.image_size

    def _output_size(self, images: Tensor) -> tuple[int, int]:
        """The sampled images' size: data.image_size (the input's when it is not known)."""
        if self.image_size:
            return (self.image_size, self.image_size)
        return tuple(images.shape[-2:])

    # ---- attention and sampling -----------------------------------------------------------------
    def attention_features(self, images: Tensor) -> Tensor:
        """X: the attention network's features, on the input resized to the output size."""
        size = self._output_size(images)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.attention_net(images)

    def attention_maps_of(self, features: Tensor) -> Tensor:
        """M(X) (B x C x h x w), without gradient: the sampler only reads it."""
        opts: TASNOptions = self.options
        with torch.no_grad():
            return trilinear_attention(features.detach(), opts.normalisation, opts.softmax_scale)

    def sample(self, images: Tensor, maps: Tensor) -> Tensor:
        """Images resampled by B x h x w maps to the output size."""
        opts: TASNOptions = self.options
        return attention_sample(
            images, maps, self._output_size(images), opts.max_zoom, opts.sampler_iterations
        )

    def structure_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The structure-preserved image and its map (B x h x w)."""
        maps = self.attention_maps_of(self.attention_features(images))
        structure = structure_map(maps, self.options.structure_power)
        return self.sample(images, structure), structure

    # ---- inference path ---------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """The master network's feature map of the structure-preserved image."""
        sampled, _ = self.structure_image(images)
        return self.backbone.forward_features(sampled)

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """Logits from the pooled master feature map."""
        return self.apply_head(self.head, self.backbone.pool(features), meta, meta_mask)

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """'loss' = master CE + part CE + lambda soft-target CE + attention-net CE (weighted)."""
        images, targets = batch.images, batch.targets
        opts: TASNOptions = self.options
        features = self.attention_features(images)
        maps = self.attention_maps_of(features)
        detail, _ = detail_map(maps)
        structure = structure_map(maps, opts.structure_power)
        sampled = torch.cat([self.sample(images, detail), self.sample(images, structure)])
        # Part-net and master-net are one network: one pass, shared batch statistics.
        part_pooled, master_pooled = self.backbone.pool(
            self.backbone.forward_features(sampled)
        ).chunk(2)
        part_head = self.head if self.part_head is None else self.part_head
        meta, meta_mask = batch.meta, batch.meta_mask
        part_logits = self.apply_head(part_head, part_pooled, meta, meta_mask)
        master_logits = self.apply_head(self.head, master_pooled, meta, meta_mask)

        smooth = opts.label_smoothing
        master = self.class_loss(master_logits, targets, smooth)
        part = self.class_loss(part_logits, targets, smooth)
        # The part-net teaches; its soft targets carry no gradient (knowledge distillation).
        distill = soft_target_cross_entropy(master_logits, part_logits.detach(), opts.temperature)
        attention = F.cross_entropy(
            self.attention_classifier(features), targets, label_smoothing=smooth
        )
        loss = (
            master
            + opts.part_weight * part
            + opts.distill_weight * distill
            + opts.attention_weight * attention
        )
        return {
            "loss": loss,
            "master": master,
            "part": part,
            "distill": distill,
            "attention": attention,
        }

    def new_modules(self) -> list[nn.Module]:
        """Classifiers and the dilated attention head are new; both CNNs are pretrained."""
        heads = [self.head, self.attention_net.head, self.attention_classifier]
        return heads + ([self.part_head] if self.part_head is not None else [])

    # ---- explain ----------------------------------------------------------------------------------
    def attention_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta=None,
        meta_mask=None,
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """The structure map (or part map `part`) over the input, in [0, 1]."""
        self.check_part(part)
        maps = self._maps(images)
        if part is None:
            chosen, name = structure_map(maps, self.options.structure_power), "structure-attention"
        else:
            chosen, name = maps[:, part], f"part-{part}"
        full = F.interpolate(
            chosen[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        return {name: normalize_maps(full.clamp_min(0))}

    def views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """The image the master network classifies, or part `part`'s detail-preserved image."""
        self.check_part(part)
        maps = self._maps(images)
        if part is None:
            structure = structure_map(maps, self.options.structure_power)
            return {"structure-preserved (sampled)": self.sample(images, structure)}
        chosen = maps[:, part]
        return {f"detail-preserved (part {part})": self.sample(images, chosen)}

    def part_count(self) -> int:
        """One part map per attention channel."""
        return self.attention_net.channels

    def _maps(self, images: Tensor) -> Tensor:
        with eval_mode(self), torch.no_grad():
            return self.attention_maps_of(self.attention_features(images))
