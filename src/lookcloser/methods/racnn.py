"""RA-CNN: Recurrent Attention CNN, "Look closer to see better" (Fu, Zheng and Mei, CVPR 2017).

Two or three scales, each its own CNN (same architecture, own weights, as the paper) with its
own classifier:

* **Attention proposal network (APN).** On scale s's feature map, two fully connected layers
  (after a 1x1 conv and a resize to a fixed grid, so any backbone and input size fit) predict
  a square (tx, ty, tl): centre and half side, in pixels of scale s's input. A sigmoid
  parameterisation keeps the square inside the image with a side of at least
  `method.min_crop` of it.
* **Crop and zoom.** The square is cut out and enlarged to the input size (bilinear), times
  the paper's boxcar mask M = [h(x - tx(tl)) - h(x - tx(br))] [h(y - ty(tl)) - h(y - ty(br))]
  with h the logistic function of slope k (`method.sharpness`) at each sampled point.
  Differentiable in (tx, ty, tl) through the mask and the sampling grid, so the ranking loss
  reaches the APN. The zoomed crop is scale s + 1's input.
* **Losses.** Cross-entropy at every scale; the pairwise ranking loss
  max(0, p_t(s) - p_t(s + 1) + margin) asks each finer scale to be more sure of the true
  class t than the coarser one.
* **Training, alternating** (the paper: classification and proposal networks are optimised
  in turn, each with the other fixed). The engine has one optimizer over all parameters, so
  the method alternates by its own step counter (a buffer: it travels in checkpoints and
  resumes): the first `apn_pretrain_steps` steps regress each APN onto the square of highest
  response in its scale's last feature map (the paper's APN initialisation; the crops then
  follow those squares, and the classifiers learn on them meanwhile), then cycles of
  `cls_steps` classification steps (cross-entropy; APN outputs detached, the APNs receive no
  gradient) and `apn_steps` proposal steps (ranking loss only; every other parameter is out
  of the graph, so it receives no gradient either and the optimizer leaves it untouched).
* **Prediction** from the fused scales (the paper): each scale's pooled feature L2-normalised,
  concatenated, one linear layer; or the scales' summed logits, or the finest scale's.

Inference, export and serving run every scale with the APNs' squares in one graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.explain.cam import normalize_maps
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import RACNNOptions
from lookcloser.methods.ramstrans import compose_boxes, draw_boxes, paste
from lookcloser.models.backbones import Backbone, BackboneFactory
from lookcloser.models.heads import HeadSpec
from lookcloser.models.modes import eval_mode

PredictFrom = Literal["fusion", "sum", "last"]
Phase = Literal["pretrain", "classify", "propose"]


# ---- squares, crops and the ranking loss --------------------------------------------------------
def square_box(squares: Tensor) -> Tensor:
    """B x 4 pixel boxes (xyxy) of B x 3 squares (tx, ty, tl: centre and half side)."""
    tx, ty, tl = squares.unbind(-1)
    return torch.stack([tx - tl, ty - tl, tx + tl, ty + tl], dim=-1)


def boxcar_zoom(images: Tensor, squares: Tensor, size: tuple[int, int], sharpness: float) -> Tensor:
    """Each image's square (B x 3: tx, ty, tl in pixels) enlarged to `size`, times the
    boxcar mask at the sampled points.

    Output pixel centres are spread evenly over the square (a square of the whole image
    samples every pixel centre: the image comes back, times a mask that is 1 inside and
    sigmoid(k / 2) on the outermost pixels). Bilinear `grid_sample`, one call for the batch.
    """
    _, _, height, width = images.shape
    out_h, out_w = size
    squares = squares.to(images.dtype)
    tx, ty, tl = squares[:, 0:1], squares[:, 1:2], squares[:, 2:3]
    uy = (torch.arange(out_h, device=images.device, dtype=images.dtype) + 0.5) / out_h
    ux = (torch.arange(out_w, device=images.device, dtype=images.dtype) + 0.5) / out_w
    ys = ty - tl + 2 * tl * uy  # B x out_h, in pixels
    xs = tx - tl + 2 * tl * ux  # B x out_w
    mask_y = torch.sigmoid(sharpness * (ys - (ty - tl))) - torch.sigmoid(
        sharpness * (ys - (ty + tl))
    )
    mask_x = torch.sigmoid(sharpness * (xs - (tx - tl))) - torch.sigmoid(
        sharpness * (xs - (tx + tl))
    )
    gy = (ys * (2.0 / height) - 1.0)[:, :, None].expand(-1, -1, out_w)
    gx = (xs * (2.0 / width) - 1.0)[:, None, :].expand(-1, out_h, -1)
    crops = F.grid_sample(
        images,
        torch.stack([gx, gy], dim=-1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return crops * (mask_y[:, :, None] * mask_x[:, None, :])[:, None]


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """B: the softmax probability of the true class (expected under soft targets)."""
    probs = logits.float().softmax(-1)
    if targets.ndim == 1:
        return probs.gather(1, targets.view(-1, 1))[:, 0]
    return (probs * targets.float()).sum(-1)


def ranking_loss(coarser: Tensor, finer: Tensor, margin: float) -> Tensor:
    """Mean of max(0, p_t(coarser) - p_t(finer) + margin): zero once the finer scale is more
    sure of the true class by the margin."""
    return F.relu(coarser - finer + margin).mean()


def response_map(features: Tensor) -> Tensor:
    """B x h x w: the channel mean of a feature map's positive part (its response)."""
    return features.float().clamp_min(0).mean(1)


def highest_response_square(
    features: Tensor, image_size: tuple[int, int], share: float = 0.5
) -> Tensor:
    """B x 3 squares (tx, ty, tl in pixels): the square of side `share` x the image's shorter
    side whose cells sum to the highest response (the paper's APN initialisation)."""
    response = response_map(features)
    b, h, w = response.shape
    height, width = image_size
    side = share * min(height, width)
    cell_y, cell_x = height / h, width / w
    win_y = max(1, min(h, round(side / cell_y)))
    win_x = max(1, min(w, round(side / cell_x)))
    sums = F.avg_pool2d(response[:, None], (win_y, win_x), stride=1)[:, 0]  # windows' mean
    best = sums.flatten(1).argmax(1)
    row = torch.div(best, sums.shape[-1], rounding_mode="floor")
    col = best - row * sums.shape[-1]
    half = torch.full((b,), side / 2, device=features.device)
    ty = ((row.float() + win_y / 2) * cell_y).clamp(side / 2, height - side / 2)
    tx = ((col.float() + win_x / 2) * cell_x).clamp(side / 2, width - side / 2)
    return torch.stack([tx, ty, half], dim=-1)


def normalized_squares(squares: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Squares with tx / W, ty / H and tl / min(H, W): the APN's regression space."""
    height, width = image_size
    return squares / squares.new_tensor([width, height, min(height, width)])


# ---- the attention proposal network -------------------------------------------------------------
class AttentionProposal(nn.Module):
    """Feature map -> square (tx, ty, tl) in pixels, inside the image, side >= min_crop.

    A 1x1 conv and a bilinear resize to a fixed grid, then the paper's two fully connected
    layers. The last starts at zero: the first proposal is the centred square halfway between
    the smallest and the whole image.
    """

    def __init__(self, in_channels: int, channels: int, grid: int, hidden: int, min_crop: float):
        super().__init__()
        self.grid = grid
        self.min_crop = min_crop
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU())
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * grid * grid, hidden), nn.Tanh(), nn.Linear(hidden, 3)
        )
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        """B x 3 squares for B x C x h x w features of an image of `image_size`."""
        x = self.reduce(features)
        x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        a, b, c = torch.sigmoid(self.fc(x)).unbind(-1)
        height, width = image_size
        low = self.min_crop / 2
        half = min(height, width) * (low + (0.5 - low) * c)
        tx = half + a * (width - 2 * half)
        ty = half + b * (height - 2 * half)
        return torch.stack([tx, ty, half], dim=-1)


# ---- the method -----------------------------------------------------------------------------------
@dataclass
class Looks:
    """One pass through the scales: each scale's input, feature map, pooled feature and
    logits; between scales, the square chosen (in that scale's input pixels) and, when asked,
    the APN's own proposal and the highest-response square."""

    images: list[Tensor]
    maps: list[Tensor]
    pooled: list[Tensor]
    logits: list[Tensor]
    squares: list[Tensor]
    proposals: list[Tensor]
    targets: list[Tensor]


@register_method
class RACNN(Method):
    """Scales of CNNs, APN squares between them, ranking loss, alternating training."""

    name = "racnn"
    Options = RACNNOptions

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: RACNNOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
        zoom_backbones: Sequence[Backbone] = (),
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        opts: RACNNOptions = self.options
        if len(zoom_backbones) != opts.scales - 1:
            raise ConfigError("method racnn: build it with RACNN.build (one network per scale)")
        self.zoom_backbones = nn.ModuleList(zoom_backbones)
        nets = self.scale_backbones()
        self.heads = nn.ModuleList(self.make_head(b.num_features) for b in nets)
        self.apns = nn.ModuleList(
            AttentionProposal(
                self._map_channels(b),
                opts.apn_channels,
                opts.apn_grid,
                opts.apn_hidden,
                opts.min_crop,
            )
            for b in nets[:-1]
        )
        self.fusion = self.make_head(sum(b.num_features for b in nets))
        # Training steps taken: decides the phase; a buffer, so it resumes from checkpoints.
        self.register_buffer("steps_done", torch.zeros(1, dtype=torch.long))

    @classmethod
    def build(
        cls,
        make_backbone: BackboneFactory,
        num_classes: int,
        options: RACNNOptions,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ) -> RACNN:
        """One network per scale from `model.*` (own weights each, as the paper)."""
        zooms = [make_backbone() for _ in range(options.scales - 1)]
        return cls(make_backbone(), num_classes, options, head, meta_keys, zooms)

    def scale_backbones(self) -> list[Backbone]:
        """The scales' networks, coarsest first."""
        return [self.backbone, *self.zoom_backbones]

    def named_backbones(self) -> dict[str, Backbone]:
        """The networks as `scale1`, `scale2`, ... (explain names their plug-ins' maps so)."""
        return {f"scale{i + 1}": b for i, b in enumerate(self.scale_backbones())}

    @staticmethod
    def _map_channels(backbone: Backbone) -> int:
        with eval_mode(backbone), torch.no_grad():
            features = backbone.forward_features(
                torch.zeros(1, 3, 64, 64, device=backbone.mean.device)
            )
            return backbone.spatial_map(features).shape[1]

    # ---- the alternation --------------------------------------------------------------------------
    def phase(self, step: int | None = None) -> Phase:
        """What training step `step` (default: the next) optimises: `pretrain` (APN regression
        and classification), `classify` (classifiers; APNs fixed) or `propose` (APNs by the
        ranking loss; classifiers fixed)."""
        opts: RACNNOptions = self.options
        step = int(self.steps_done) if step is None else step
        if step < opts.apn_pretrain_steps:
            return "pretrain"
        position = (step - opts.apn_pretrain_steps) % (opts.cls_steps + opts.apn_steps)
        return "classify" if position < opts.cls_steps else "propose"

    @contextlib.contextmanager
    def _classifiers_fixed(self) -> Iterator[None]:
        """Within the block, the scale networks and heads are out of the autograd graph (their
        gradients stay None, so the optimizer skips them)."""
        params = [
            p
            for m in (*self.scale_backbones(), self.heads, self.fusion)
            for p in m.parameters()
            if p.requires_grad
        ]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # ---- the recurrent pass -----------------------------------------------------------------------
    def look_closer(
        self,
        images: Tensor,
        phase: Phase | None = None,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
    ) -> Looks:
        """Every scale in turn; between scales, the square (APN's, or during the APN
        pretraining the highest-response one) cut out and zoomed to the input size. Metadata,
        with model.fusion, joins every scale's head.

        `phase=None` (inference) and `classify` detach the crops: no gradient to the APNs;
        `propose` keeps them attached so the ranking loss reaches the APNs.
        """
        opts: RACNNOptions = self.options
        size = (int(images.shape[-2]), int(images.shape[-1]))
        looks = Looks([], [], [], [], [], [], [])
        current = images
        nets = self.scale_backbones()
        for s, (net, head) in enumerate(zip(nets, self.heads, strict=True)):
            features = net.forward_features(current)
            fmap = net.spatial_map(features)
            pooled = net.pool(features)
            looks.images.append(current)
            looks.maps.append(fmap)
            looks.pooled.append(pooled)
            looks.logits.append(self.apply_head(head, pooled, meta, meta_mask))
            if s == len(nets) - 1:
                break
            apn = self.apns[s]
            if phase == "pretrain":
                with torch.no_grad():
                    target = highest_response_square(fmap.detach(), size, opts.response_crop)
                looks.targets.append(target)
                looks.proposals.append(apn(fmap.detach(), size))
                square = target
            elif phase == "propose":
                square = apn(fmap, size)
            else:
                with torch.no_grad():
                    square = apn(fmap.detach(), size)
            looks.squares.append(square)
            zoomed = boxcar_zoom(current, square, size, opts.sharpness)
            current = zoomed if phase == "propose" else zoomed.detach()
        return looks

    def combine(
        self, looks: Looks, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """The prediction: fusion of the normalised scale features, summed logits, or last."""
        opts: RACNNOptions = self.options
        if opts.predict_from == "last":
            return looks.logits[-1]
        if opts.predict_from == "sum":
            return torch.stack(looks.logits).sum(0)
        joined = torch.cat([F.normalize(p, dim=-1) for p in looks.pooled], dim=-1)
        return self.apply_head(self.fusion, joined, meta, meta_mask)

    # ---- inference path ---------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """The first scale's feature map (what Grad-CAM explains)."""
        return self.backbone.forward_features(images)

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """The first scale's logits from its feature map."""
        return self.apply_head(self.heads[0], self.backbone.pool(features), meta, meta_mask)

    def forward(self, images: Tensor, meta=None, meta_mask=None) -> Tensor:
        """The prediction from every scale, squares from the APNs."""
        return self.combine(self.look_closer(images, None, meta, meta_mask), meta, meta_mask)

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The losses of this step's phase (see `phase`); logs which phase ran."""
        opts: RACNNOptions = self.options
        phase = self.phase()
        targets, meta, meta_mask = batch.targets, batch.meta, batch.meta_mask
        if phase == "propose":
            with self._classifiers_fixed():
                looks = self.look_closer(batch.images, phase, meta, meta_mask)
            probs = [true_class_probability(lg, targets) for lg in looks.logits]
            parts = {
                f"rank{s + 1}{s + 2}": ranking_loss(probs[s], probs[s + 1], opts.margin)
                for s in range(len(probs) - 1)
            }
            loss = torch.stack(list(parts.values())).sum()
        else:
            looks = self.look_closer(batch.images, phase, meta, meta_mask)
            smooth = opts.label_smoothing
            parts = {
                f"scale{s + 1}": self.class_loss(lg, targets, smooth)
                for s, lg in enumerate(looks.logits)
            }
            # The fusion layer learns on the scales' features without changing them.
            joined = torch.cat([F.normalize(p.detach(), dim=-1) for p in looks.pooled], dim=-1)
            fused = self.apply_head(self.fusion, joined, meta, meta_mask)
            parts["fusion"] = self.class_loss(fused, targets, smooth)
            loss = torch.stack(list(parts.values())).sum()
            if phase == "pretrain":
                size = tuple(batch.images.shape[-2:])
                apn = sum(
                    F.mse_loss(normalized_squares(p, size), normalized_squares(t, size))
                    for p, t in zip(looks.proposals, looks.targets, strict=True)
                )
                parts["apn_pretrain"] = apn
                loss = loss + opts.apn_pretrain_weight * apn
        with torch.no_grad():
            self.steps_done += 1
        phase_code = {"pretrain": 0.0, "classify": 1.0, "propose": 2.0}[phase]
        return {"loss": loss, **parts, "phase": loss.new_tensor(phase_code)}

    def new_modules(self) -> list[nn.Module]:
        """The heads, the APNs and the fusion layer are new; the scale networks pretrained."""
        return [self.heads, self.apns, self.fusion]

    def lr_scales(self) -> list[tuple[nn.Module, float]]:
        """The APNs at method.apn_lr_scale x optim.lr, when set."""
        scale = self.options.apn_lr_scale
        return [(self.apns, scale)] if scale is not None else []

    # ---- explain ----------------------------------------------------------------------------------
    def _explained(self, images: Tensor) -> Looks:
        with eval_mode(self), torch.no_grad():
            return self.look_closer(images)

    @staticmethod
    def _regions(looks: Looks, size: tuple[int, int]) -> list[Tensor]:
        """Each scale's input as a pixel box (xyxy) of the original image."""
        first = looks.images[0]
        regions = [first.new_tensor([0.0, 0.0, size[1], size[0]]).expand(first.shape[0], 4)]
        for square in looks.squares:
            regions.append(compose_boxes(regions[-1], square_box(square), size))
        return regions

    def attention_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta=None,
        meta_mask=None,
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """Grad-CAM of the first scale, then each scale's response map (what the APNs were
        pretrained to follow) placed over the region of the image that scale saw."""
        self.check_part(part)
        size = tuple(images.shape[-2:])
        looks = self._explained(images)
        maps = {"grad-cam-scale1": self.attention(images, target, meta, meta_mask)}
        for s, (fmap, region) in enumerate(
            zip(looks.maps, self._regions(looks, size), strict=True)
        ):
            response = normalize_maps(response_map(fmap))
            maps[f"response-scale{s + 1}"] = paste(response, region, size).clamp(0, 1)
        return maps

    def views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """Per scale, its input with the APN's square drawn, then the zoomed crop the next
        scale classified."""
        self.check_part(part)
        looks = self._explained(images)
        pictures = {}
        for s, square in enumerate(looks.squares):
            pictures[f"scale {s + 1}: square"] = draw_boxes(looks.images[s], square_box(square))
            pictures[f"scale {s + 2}: zoomed crop"] = looks.images[s + 1].clamp(0, 1)
        return pictures
