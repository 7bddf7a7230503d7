"""DCL: Destruction and Construction Learning (Chen et al., CVPR 2019).

Training adds three things to a plain backbone + linear classifier:

* **Destruction (RCM).** Each image is cut into N x N regions, which are shuffled within a
  neighbourhood of k: first inside every row, then inside every column of the result
  (q_i = i + r, r ~ U(-k, k), sorted), so no region moves by 2k or more along either axis.
  The destroyed images carry the original's label and are classified by the same head.
* **Adversarial loss.** A linear head on the pooled feature tells originals from destroyed
  images (`binary`, the paper), or, as in the released code, classifies into 2 x num_classes
  where destroyed images take label + num_classes (`class_pairs`).
* **Construction (region alignment).** A 1x1 conv on the last feature map, pooled to N x N,
  predicts for every cell where the region shown there sits in the original image.

L = alpha L_cls + beta L_adv + gamma L_loc. Inference is the plain classifier: the forward is
exactly the baseline's, and `for_inference` drops the adversary (`training_only`); the
alignment conv stays so that `explain` can show the region-alignment map.

Image sizes not divisible by N: regions are floor(H / N) x floor(W / N) pixels and the region
grid covers the centred floor(H / N) * N x floor(W / N) * N area; the fewer than N leftover
pixel rows and columns at the borders stay where they are. The destroyed image is thus an
exact re-tiling of the original's regions, with equal-size regions only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import DCLOptions
from lookcloser.models.backbones import Backbone
from lookcloser.models.heads import HeadSpec
from lookcloser.models.modes import eval_mode

AlignmentKind = Literal["coords", "index"]


# ---- RCM: the region confusion mechanism ------------------------------------------------------
def rcm_permutation(
    batch: int, regions: int, neighbourhood: int, generator: torch.Generator | None = None
) -> Tensor:
    """B x N x N long tensor: cell (r, c) of a destroyed image shows original region `r*N + c`.

    Drawn on the CPU from `generator` (or the global torch RNG), so a seed gives the same
    permutations on every device.
    """
    n, k = regions, neighbourhood
    line = torch.arange(n, dtype=torch.float64)

    def shuffle_lines() -> Tensor:
        # [b, line, position] -> index along the line of the region that lands at `position`.
        jitter = (torch.rand(batch, n, n, generator=generator, dtype=torch.float64) * 2 - 1) * k
        return torch.argsort(line + jitter, dim=-1, stable=True)

    col_source = shuffle_lines()  # inside each row: which column lands where
    row_source = shuffle_lines()  # then inside each column of that result: which row
    source_row = row_source.transpose(1, 2)  # [b, R, C] = row_source[b, C, R]
    source_col = torch.gather(col_source, 1, source_row)  # column in that source row
    return source_row * n + source_col


def region_grid(height: int, width: int, regions: int) -> tuple[int, int, int, int]:
    """(top, left, region height, region width) of the centred N x N region grid."""
    tile_h, tile_w = height // regions, width // regions
    if tile_h == 0 or tile_w == 0:
        raise ConfigError(
            f"method.regions={regions}: images of {height}x{width} px cannot be cut into "
            f"{regions}x{regions} regions; expected regions <= {min(height, width)}"
        )
    return (height - tile_h * regions) // 2, (width - tile_w * regions) // 2, tile_h, tile_w


def retile(images: Tensor, source: Tensor, regions: int) -> Tensor:
    """Images whose region at cell (r, c) is the original region `source[b, r, c]`."""
    b, c, h, w = images.shape
    n = regions
    top, left, th, tw = region_grid(h, w, n)
    grid = images[:, :, top : top + th * n, left : left + tw * n]
    tiles = grid.reshape(b, c, n, th, n, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, th, tw)
    rows = torch.arange(b, device=images.device)[:, None]
    picked = tiles[rows, source.reshape(b, n * n).to(images.device)]
    shuffled = picked.reshape(b, n, n, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    out = images.clone()
    out[:, :, top : top + th * n, left : left + tw * n] = shuffled.reshape(b, c, th * n, tw * n)
    return out


def region_confusion(
    images: Tensor,
    regions: int,
    neighbourhood: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Destroyed images (B x 3 x H x W) and their permutations (B x N x N source indices)."""
    source = rcm_permutation(images.shape[0], regions, neighbourhood, generator)
    return retile(images, source, regions), source.to(images.device)


def identity_source(batch: int, regions: int, device: torch.device | str = "cpu") -> Tensor:
    """B x N x N source indices of undestroyed images (every region where it was)."""
    grid = torch.arange(regions * regions, device=device).view(1, regions, regions)
    return grid.expand(batch, -1, -1)


def alignment_targets(source: Tensor, regions: int, kind: AlignmentKind) -> Tensor:
    """What the alignment head must predict for source indices (B x N x N).

    `coords` (paper): 2 channels, the source (row, col) as region-centre positions
    (index + 0.5) / N in (0, 1). `index` (released code): 1 channel, the flattened source
    index normalised as (idx - N*N // 2) / (N*N).
    """
    cells = regions * regions
    if kind == "index":
        return ((source - cells // 2).float() / cells).unsqueeze(1)
    row, col = source // regions, source % regions
    return (torch.stack([row, col], dim=1).float() + 0.5) / regions


# ---- heads ------------------------------------------------------------------------------------
class RegionAlignment(nn.Module):
    """1x1 conv on the feature grid -> N x N map of predicted source positions."""

    def __init__(self, channels: int, regions: int, kind: AlignmentKind = "coords"):
        super().__init__()
        self.regions = regions
        self.kind = kind
        self.conv = nn.Conv2d(channels, 2 if kind == "coords" else 1, kernel_size=1)

    def forward(self, grid: Tensor) -> Tensor:
        """B x (2 | 1) x N x N predictions from a B x C x h x w feature grid."""
        out = self.conv(grid)
        if self.kind == "coords":
            # Paper: ReLU, then average pooling to N x N.
            return F.adaptive_avg_pool2d(F.relu(out), self.regions)
        # Released code: average pooling, then tanh.
        return torch.tanh(F.adaptive_avg_pool2d(out, self.regions))

    def error_in_cells(self, predicted: Tensor, source: Tensor) -> Tensor:
        """B x N x N distance between predicted and true positions, in region cells."""
        err = (predicted - alignment_targets(source, self.regions, self.kind)).abs()
        if self.kind == "coords":
            return err.mean(dim=1) * self.regions  # mean over the (row, col) axes
        return err[:, 0] * self.regions * self.regions  # steps of the flattened index


def alignment_map(method: Method, alignment: RegionAlignment, images: Tensor) -> Tensor:
    """B x H x W map in (0, 1]: 1 / (1 + error in cells) of the head on the undestroyed image."""
    with eval_mode(method), torch.no_grad():
        grid = method.backbone.spatial_map(method.forward_features(images))
        predicted = alignment(grid)
        source = identity_source(images.shape[0], alignment.regions, images.device)
        score = 1.0 / (1.0 + alignment.error_in_cells(predicted, source))
    # Nearest: the map is per region, its cells should stay visible as cells.
    return F.interpolate(score[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0]


# ---- the training method ----------------------------------------------------------------------
@register_method
class DCL(Method):
    """Destruction and Construction Learning: RCM + adversarial + region-alignment losses."""

    name = "dcl"
    Options = DCLOptions
    # The alignment conv is not training-only: explain's region-alignment map needs it.
    training_only = ("adversary",)

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: DCLOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        opts: DCLOptions = self.options
        self.head = self.make_head(backbone.num_features)
        # A plain Linear, not a registry head: it tells originals from destroyed images (a
        # domain classifier inside DCL's loss), not classes, so model.head must not change it.
        domains = 2 if opts.adversarial_head == "binary" else 2 * num_classes
        self.adversary = nn.Linear(backbone.num_features, domains)
        self.alignment = RegionAlignment(backbone.num_features, opts.regions, opts.alignment)
        self._warned_grid = False

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """Logits from the pooled feature map (the baseline's head)."""
        return self.apply_head(self.head, self.backbone.pool(features), meta, meta_mask)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """'loss' = alpha cls + beta adv + gamma loc; 'cls', 'adv', 'loc' unweighted."""
        images, targets = batch.images, batch.targets
        opts: DCLOptions = self.options
        b = images.shape[0]
        n = opts.regions
        n_destroyed = round(opts.destroy_ratio * b)
        # Which original each destroyed image comes from (several copies when ratio > 1).
        origin = torch.arange(n_destroyed, device=images.device) % b
        destroyed, source = region_confusion(images[origin], n, opts.neighbourhood)
        # Originals and destroyed images share one forward pass (and its batch statistics).
        features = self.forward_features(torch.cat([images, destroyed]))
        pooled = self.backbone.pool(features)

        cls_targets = torch.cat([targets, targets[origin]])
        meta, meta_mask = batch.meta, batch.meta_mask
        if meta is not None:  # a destroyed image keeps its original's metadata
            meta, meta_mask = (
                torch.cat([meta, meta[origin]]),
                torch.cat([meta_mask, meta_mask[origin]]),
            )
        logits = self.apply_head(self.head, pooled, meta, meta_mask)
        cls = self.class_loss(logits, cls_targets, opts.label_smoothing)
        adv = F.cross_entropy(self.adversary(pooled), self._domain_targets(targets, origin))

        grid = self.backbone.spatial_map(features)
        self._check_grid(grid)
        all_sources = torch.cat([identity_source(b, n, images.device), source])
        loc = F.l1_loss(self.alignment(grid), alignment_targets(all_sources, n, opts.alignment))

        loss = opts.alpha * cls + opts.beta * adv + opts.gamma * loc
        return {"loss": loss, "cls": cls, "adv": adv, "loc": loc}

    def _domain_targets(self, targets: Tensor, origin: Tensor) -> Tensor:
        """Adversarial targets: originals first, then destroyed images."""
        b, nd = targets.shape[0], origin.shape[0]
        device = targets.device
        if self.options.adversarial_head == "binary":
            return torch.cat(
                [
                    torch.zeros(b, dtype=torch.long, device=device),
                    torch.ones(nd, dtype=torch.long, device=device),
                ]
            )
        if targets.ndim == 1:  # class indices: destroyed images take label + num_classes
            return torch.cat([targets, targets[origin] + self.num_classes])
        # Class probabilities (mixup): originals fill the first half, destroyed the second.
        zeros = torch.zeros_like(targets)
        return torch.cat(
            [torch.cat([targets, zeros], dim=1), torch.cat([zeros, targets], dim=1)[origin]]
        )

    def _check_grid(self, grid: Tensor) -> None:
        if self._warned_grid:
            return
        h, w = grid.shape[-2:]
        n = self.options.regions
        if h < n or w < n:
            warnings.warn(
                f"method.regions={n} but the backbone's feature map is {h}x{w}: the alignment "
                "head cannot tell every region apart; use a larger data.image_size or fewer "
                "regions (image_size / regions should be a multiple of the backbone's stride)",
                stacklevel=3,
            )
        self._warned_grid = True

    def attention_maps(
        self, images: Tensor, target: Tensor | None = None, meta=None, meta_mask=None, part=None
    ) -> dict[str, Tensor]:
        """Grad-CAM, and how well each region's position is recovered."""
        self.check_part(part)
        return {
            "grad-cam": self.attention(images, target, meta, meta_mask),
            "region-alignment": alignment_map(self, self.alignment, images),
        }

    def new_modules(self) -> list[nn.Module]:
        """The classifier, the adversarial head and the alignment conv are new."""
        return [self.head, self.adversary, self.alignment]
