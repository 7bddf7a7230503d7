"""RAMS-Trans: Recurrent Attention Multi-scale Transformer (Hu et al., ACM MM 2021).

One network looks at the image several times, each time closer:

* **Patch importance.** On a Vision Transformer, attention rollout over all blocks: each
  block's attention averaged over heads, plus the identity, rows renormalised, multiplied in
  block order; the class token's row (or the mean over query rows, as the released code)
  over the patch tokens, divided by its max. Read from the same forward that gives the
  scale's logits (hooks on the blocks' attention probabilities), not a second pass.
  Beyond the paper: `importance=cam` takes the class activation map of the predicted class
  on a CNN's last feature map instead, so the same zoom runs on CNN backbones.
* **DPPM (dynamic patch proposal).** Patches above alpha x the mean importance; their largest
  8-connected component; its bounding box mapped from the patch grid to pixels; that region
  cropped and resized (bilinear, `grid_sample`) to the input size, detached, and classified
  by the same weights. A third scale zooms into the second's crop the same way. Batched
  tensor code throughout (no per-sample loop, no scipy), which also exports to ONNX.
* **Loss / prediction.** Cross-entropy on every scale; the prediction sums the scales'
  logits (or takes the last scale's).

Where a choice follows the released code rather than the paper, the option's HELP says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods.base import Method, register_method
from lookcloser.methods.options import RAMSTransOptions
from lookcloser.models.backbones import Backbone
from lookcloser.models.heads import HeadSpec
from lookcloser.models.modes import eval_mode

# The box-from-attention pieces live in models/zoom.py (crop fusion uses them too); imported
# here under their old names, which RA-CNN, DCN and the tests use.
from lookcloser.models.zoom import (  # noqa: F401
    RolloutAccumulator,
    RolloutQuery,
    attention_rollout,
    can_rollout,
    cell_size,
    cells_to_pixels,
    class_activation_map,
    component_box,
    draw_boxes,
    has_class_token,
    label_components,
    largest_component,
    normalize_by_max,
    propose_boxes,
    rollout_importance,
    rollout_step,
    threshold_mask,
    zoom,
)

log = logging.getLogger(__name__)

Importance = Literal["auto", "rollout", "cam"]
PredictFrom = Literal["sum", "last"]


def compose_boxes(outer: Tensor, inner: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes `inner` (xyxy pixels of a crop of `size`, made from box `outer`) in the outer
    image's pixels."""
    scale_x = (outer[:, 2:3] - outer[:, 0:1]) / size[1]
    scale_y = (outer[:, 3:4] - outer[:, 1:2]) / size[0]
    scale = torch.cat([scale_x, scale_y, scale_x, scale_y], dim=1)
    origin = torch.cat([outer[:, 0:2], outer[:, 0:2]], dim=1)
    return origin + inner * scale


def paste(maps: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """B x H x W: each B x h x w map stretched (bilinear) over its pixel box, 0 outside."""
    height, width = image_size
    dtype = maps.dtype
    py = (torch.arange(height, device=maps.device, dtype=dtype) + 0.5)[None]
    px = (torch.arange(width, device=maps.device, dtype=dtype) + 0.5)[None]
    ty = (py - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]).clamp_min(1e-6)  # B x H
    tx = (px - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]).clamp_min(1e-6)  # B x W
    gy = (ty * 2 - 1)[:, :, None].expand(-1, -1, width)
    gx = (tx * 2 - 1)[:, None, :].expand(-1, height, -1)
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(
        maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    inside = ((ty >= 0) & (ty <= 1))[:, :, None] & ((tx >= 0) & (tx <= 1))[:, None, :]
    return out * inside


# ---- pictures for explain ---------------------------------------------------------------------------
def jet(maps: Tensor) -> Tensor:
    """B x 3 x H x W colours of B x H x W maps in [0, 1] (the jet colormap, piecewise linear)."""
    t = maps.clamp(0, 1)[:, None]
    return torch.cat(
        [(1.5 - (4 * t - centre).abs()).clamp(0, 1) for centre in (3.0, 2.0, 1.0)], dim=1
    )


# ---- the method -----------------------------------------------------------------------------------
@dataclass
class Looks:
    """What one recurrent pass saw: per scale its input, logits and patch importance, and
    the pixel boxes (in that scale's input) chosen for the next scale."""

    images: list[Tensor]
    logits: list[Tensor]
    importance: list[Tensor | None]
    boxes: list[Tensor]


@register_method
class RAMSTrans(Method):
    """Recurrent zoom with one backbone and one head: importance -> DPPM box -> crop -> again."""

    name = "ramstrans"
    Options = RAMSTransOptions

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        options: RAMSTransOptions | None = None,
        head: str | HeadSpec = "linear",
        meta_keys: Sequence[str] = (),
    ):
        super().__init__(backbone, num_classes, options, head=head, meta_keys=meta_keys)
        opts: RAMSTransOptions = self.options
        self.head = self.make_head(backbone.num_features)
        rollout_ok = can_rollout(backbone)
        if opts.importance == "rollout" and not rollout_ok:
            raise ConfigError(
                f"method.importance=rollout: {backbone.name!r} is not a Vision Transformer "
                "with timm attention blocks; use method.importance=cam (or auto)"
            )
        self.importance_kind = (
            opts.importance if opts.importance != "auto" else "rollout" if rollout_ok else "cam"
        )
        self.prefix_tokens = int(getattr(backbone.model, "num_prefix_tokens", 0))
        has_cls = has_class_token(backbone)
        if self.importance_kind == "rollout" and opts.rollout_query == "cls" and not has_cls:
            raise ConfigError(
                f"method.rollout_query=cls: {backbone.name!r} has no class token; "
                "use method.rollout_query=mean"
            )

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int | None:
        """data.image_size; setting it fits a ViT's position embeddings to that size."""
        return self.__dict__.get("_image_size")

    @image_size.setter
    def image_size(self, size: int | None) -> None:
        self.__dict__["_image_size"] = size
        if size:
            self._fit_position_embeddings(size)

    def _fit_position_embeddings(self, size: int) -> None:
        """Resample a ViT's position embeddings to a size x size input (timm's
        `set_input_size`: bicubic interpolation of the pretrained grid). Every scale's input
        has this size, so the embeddings are trained at the grid they are used at, and a
        dynamic_img_size ViT finds them at the right size instead of interpolating them at
        every forward. (ONNX export of a dynamic_img_size ViT still fails: timm then always
        interpolates, with an antialiased bicubic resize ONNX lacks; use model.kwargs.img_size.)"""
        model = self.backbone.model
        embed = getattr(model, "patch_embed", None)
        if embed is None or not hasattr(model, "set_input_size"):
            return
        if tuple(embed.img_size) == (size, size):
            return
        log.info("ramstrans: %s position embeddings resampled to %d px", self.backbone.name, size)
        model.set_input_size(img_size=(size, size))

    def _cell_size(self, image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
        """Pixels per grid cell (the ViT's patch size, or the CNN's stride)."""
        return cell_size(self.backbone, self.importance_kind, image_hw, grid)

    def _alpha(self, scale: int) -> float:
        opts: RAMSTransOptions = self.options
        return opts.third_alpha if scale == 1 and opts.third_alpha > 0 else opts.alpha

    # ---- one look ---------------------------------------------------------------------------------
    def _look(
        self,
        images: Tensor,
        with_importance: bool,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits of one scale and, if asked, its B x h x w patch importance (no gradient).

        Rollout reads the attention of this same forward: one pass per scale, with the
        attention computed unfused (the matrix must exist) only where a box is chosen.
        """
        if with_importance and self.importance_kind == "rollout":
            accumulator = RolloutAccumulator()
            with self.backbone.watch_attention(accumulator):
                features = self.backbone.forward_features(images)
            grid = tuple(self.backbone.spatial_map(features).shape[-2:])
            importance = rollout_importance(
                accumulator.rollout, self.prefix_tokens, grid, self.options.rollout_query
            )
            return self.forward_head(features, meta, meta_mask), importance
        features = self.backbone.forward_features(images)
        logits = self.forward_head(features, meta, meta_mask)
        if not with_importance:
            return logits, None
        with torch.no_grad():
            fmap = self.backbone.spatial_map(features.detach())
            importance = class_activation_map(fmap, self.head, logits.detach().argmax(1))
        return logits, importance

    def look_closer(
        self,
        images: Tensor,
        importance_everywhere: bool = False,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
    ) -> Looks:
        """The recurrent pass: each scale's logits; between scales DPPM picks a box whose
        crop, resized to the input size and detached, is the next scale's input. Metadata,
        with model.fusion, joins every scale's head (the CAM reads the image-only path)."""
        opts: RAMSTransOptions = self.options
        size = tuple(images.shape[-2:])
        looks = Looks([], [], [], [])
        current = images
        for scale in range(opts.scales):
            last = scale == opts.scales - 1
            logits, importance = self._look(
                current, importance_everywhere or not last, meta, meta_mask
            )
            looks.images.append(current)
            looks.logits.append(logits)
            looks.importance.append(importance)
            if last:
                break
            with torch.no_grad():
                grid = tuple(importance.shape[-2:])
                boxes = propose_boxes(
                    importance, self._alpha(scale), self._cell_size(size, grid), size
                )
                current = zoom(current.detach(), boxes, size)
            looks.boxes.append(boxes)
        return looks

    def combine(self, logits: list[Tensor]) -> Tensor:
        """The prediction: the scales' summed logits, or the last scale's."""
        if self.options.predict_from == "last":
            return logits[-1]
        return torch.stack(logits).sum(0)

    # ---- inference path ---------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> Tensor:
        """The first scale's feature map (the backbone on the whole image)."""
        return self.backbone.forward_features(images)

    def forward_head(self, features: Tensor, meta=None, meta_mask=None) -> Tensor:
        """One scale's logits from its feature map."""
        return self.apply_head(self.head, self.backbone.pool(features), meta, meta_mask)

    def forward(self, images: Tensor, meta=None, meta_mask=None) -> Tensor:
        """The multi-scale prediction: every scale, boxes chosen as in training."""
        return self.combine(self.look_closer(images, meta=meta, meta_mask=meta_mask).logits)

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """'loss' = CE of scale 1 + zoom_loss_weight x CE of each zoomed scale."""
        opts: RAMSTransOptions = self.options
        looks = self.look_closer(batch.images, meta=batch.meta, meta_mask=batch.meta_mask)
        parts = {
            f"scale{i + 1}": self.class_loss(logits, batch.targets, opts.label_smoothing)
            for i, logits in enumerate(looks.logits)
        }
        zoomed = [parts[f"scale{i + 1}"] for i in range(1, opts.scales)]
        loss = parts["scale1"] + opts.zoom_loss_weight * torch.stack(zoomed).sum()
        return {"loss": loss, **parts}

    def new_modules(self) -> list[nn.Module]:
        """The class head is new; the backbone is the only other network."""
        return [self.head]

    # ---- explain ----------------------------------------------------------------------------------
    def _explained(self, images: Tensor, meta=None, meta_mask=None) -> Looks:
        with eval_mode(self), torch.no_grad():
            return self.look_closer(images, True, meta, meta_mask)

    @staticmethod
    def _regions(looks: Looks, size: tuple[int, int]) -> list[Tensor]:
        """Each scale's input as a pixel box of the original image."""
        first = looks.images[0]
        whole = first.new_tensor([0.0, 0.0, size[1], size[0]]).expand(first.shape[0], 4)
        regions = [whole]
        for boxes in looks.boxes:
            regions.append(compose_boxes(regions[-1], boxes, size))
        return regions

    def attention(self, images, target=None, meta=None, meta_mask=None) -> Tensor:
        """The first scale's patch importance over the image (what chose the first box)."""
        return next(iter(self.attention_maps(images, target, meta, meta_mask).values()))

    def attention_maps(
        self,
        images: Tensor,
        target: Tensor | None = None,
        meta=None,
        meta_mask=None,
        part: int | None = None,
    ) -> dict[str, Tensor]:
        """Each scale's patch importance, placed over the region of the image it saw (0
        elsewhere): `<rollout|cam>-scale1`, `-scale2`, ... The maps are the ones that chose
        the boxes (the predicted class's, for cam), whatever `target` is."""
        self.check_part(part)
        size = tuple(images.shape[-2:])
        looks = self._explained(images, meta, meta_mask)
        regions = self._regions(looks, size)
        return {
            f"{self.importance_kind}-scale{i + 1}": paste(importance, region, size).clamp(0, 1)
            for i, (importance, region) in enumerate(zip(looks.importance, regions, strict=True))
        }

    def views(self, images: Tensor, part: int | None = None) -> dict[str, Tensor]:
        """Per scale: the image it saw with its importance and the box it chose drawn on it,
        and the zoomed crop the next scale classified."""
        self.check_part(part)
        size = tuple(images.shape[-2:])
        looks = self._explained(images)
        pictures = {}
        for i, (seen, importance) in enumerate(zip(looks.images, looks.importance, strict=True)):
            heat = F.interpolate(
                importance[:, None], size=size, mode="bilinear", align_corners=False
            )[:, 0]
            blended = 0.55 * seen + 0.45 * jet(heat)
            if i < len(looks.boxes):
                pictures[f"scale {i + 1}: importance, box"] = draw_boxes(blended, looks.boxes[i])
                pictures[f"scale {i + 2}: zoomed crop"] = looks.images[i + 1]
            else:
                pictures[f"scale {i + 1}: importance"] = blended
        return pictures
