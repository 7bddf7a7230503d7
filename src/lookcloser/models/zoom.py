"""Boxes from a model's own attention, and crops of them: shared by RAMS-Trans's zoom and
crop fusion (`model.crop_fusion`).

* **Importance.** Attention rollout over a Vision Transformer's blocks (each block's attention
  averaged over heads, plus the identity, rows renormalised, multiplied in block order), read
  from the forward that gives the features (`RolloutAccumulator` on
  `Backbone.watch_attention`); or the class activation map of a class on a CNN's last
  feature map (`class_activation_map`).
* **Box (DPPM, RAMS-Trans's dynamic patch proposal).** Cells above alpha x the mean
  importance; their largest 8-connected component; its bounding box mapped from the grid to
  pixels (`propose_boxes`).
* **Crop.** The box resized to the input size, bilinear, one `grid_sample` (`zoom`).

Batched tensor code throughout (no per-sample loop, no scipy), so it exports to ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.errors import ConfigError

RolloutQuery = Literal["cls", "mean"]


# ---- attention rollout ----------------------------------------------------------------------------
def rollout_step(rollout: Tensor | None, probs: Tensor) -> Tensor:
    """Fold one block's attention probabilities (B x heads x N x N) into the rollout so far.

    The block's matrix is the head mean plus the identity (the residual path), rows
    renormalised to sum to 1; it multiplies the product of the earlier blocks from the left.
    """
    attention = probs.float().mean(1)
    n = attention.shape[-1]
    attention = attention + torch.eye(n, device=attention.device, dtype=attention.dtype)
    attention = attention / attention.sum(-1, keepdim=True)
    return attention if rollout is None else attention @ rollout


def attention_rollout(probs: Sequence[Tensor]) -> Tensor:
    """B x N x N attention rollout of the blocks' probabilities, given in block order."""
    if not probs:
        raise ValueError("attention_rollout: no attention blocks")
    rollout = None
    for block in probs:
        rollout = rollout_step(rollout, block)
    return rollout


class RolloutAccumulator:
    """A `Backbone.watch_attention` callback: the rollout of the blocks seen so far.

    Folding each block in as it comes keeps one B x N x N matrix instead of every block's
    B x heads x N x N probabilities. No gradient: the rollout only chooses boxes.
    """

    def __init__(self) -> None:
        self.rollout: Tensor | None = None

    def __call__(self, probs: Tensor) -> None:
        with torch.no_grad():
            self.rollout = rollout_step(self.rollout, probs.detach())


def rollout_importance(
    rollout: Tensor, prefix_tokens: int, grid: tuple[int, int], query: RolloutQuery = "cls"
) -> Tensor:
    """B x h x w patch importance in [0, 1] from a B x N x N rollout.

    `cls`: the class token's row (the paper); `mean`: the mean over all query rows (the
    released code). Only the patch tokens' columns count; the map is divided by its max.
    """
    patches = rollout[:, :, prefix_tokens:]
    row = patches[:, 0] if query == "cls" else patches.mean(1)
    if row.shape[1] != grid[0] * grid[1]:
        raise ConfigError(
            f"method.importance=rollout: {row.shape[1]} patch tokens do not form the "
            f"{grid[0]} x {grid[1]} grid; rollout needs global attention over the patch grid "
            "(a plain ViT); use method.importance=cam on this backbone"
        )
    return normalize_by_max(row.reshape(-1, *grid))


def normalize_by_max(maps: Tensor) -> Tensor:
    """Each B x h x w map divided by its max (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps / peak[:, None, None]


def class_activation_map(features: Tensor, head: nn.Module, classes: Tensor) -> Tensor:
    """B x h x w class activation map (ReLU, divided by its max) of `classes` (B,).

    `features` is the B x C x h x w map the head reads after pooling. Each location's
    features go through the head, less the head's output at zero (its bias): for an
    average-pooled CNN with a linear head this is exactly CAM, sum_k w_ck f_k(x, y).
    """
    b, c, h, w = features.shape
    # One row per location (heads that normalise along dim 1 take rows only, e.g. prototypes).
    local = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    scores = (head(local) - head(local.new_zeros(1, c))).view(b, h, w, -1)  # B x h x w x K
    index = classes.view(b, 1, 1, 1).expand(b, h, w, 1)
    return normalize_by_max(F.relu(scores.gather(-1, index)[..., 0]))


# ---- DPPM: dynamic patch proposal --------------------------------------------------------------
def threshold_mask(importance: Tensor, alpha: float) -> Tensor:
    """B x h x w bool: the patches whose importance exceeds alpha x the map's mean."""
    mean = importance.flatten(1).mean(1)
    return importance > alpha * mean[:, None, None]


def label_components(mask: Tensor, iterations: int | None = None) -> Tensor:
    """B x h x w labels of the mask's 8-connected components (float; 0 off the mask).

    Every cell of a component carries h*w minus the raster index of the component's first
    cell, so labels are unique per component and order components as a raster scan finds
    them. Labels spread by 3 x 3 max pooling restricted to the mask, one cell per step.
    `iterations=None` steps until nothing changes (eager); an int steps exactly that often.
    When traced (ONNX export) the count is h*w - 1, enough for any component on the grid: a
    label needs at most (cells of its component - 1) steps to reach every cell.
    """
    _, h, w = mask.shape
    inside = mask.to(torch.float32)[:, None]
    first = h * w - torch.arange(h * w, device=mask.device, dtype=torch.float32)
    labels = first.view(1, 1, h, w) * inside
    if iterations is None and torch.jit.is_tracing():
        iterations = h * w - 1
    if iterations is None:
        while True:
            spread = F.max_pool2d(labels, 3, stride=1, padding=1) * inside
            if torch.equal(spread, labels):
                break
            labels = spread
    else:
        for _ in range(iterations):
            labels = F.max_pool2d(labels, 3, stride=1, padding=1) * inside
    return labels[:, 0]


def largest_component(mask: Tensor, iterations: int | None = None) -> Tensor:
    """B x h x w bool: the mask's largest 8-connected component (all False on an empty mask).

    Sizes are counted per label with a scatter-add; between equal sizes the component met
    first in raster order wins (as skimage's regionprops order in the released code).
    """
    b, h, w = mask.shape
    labels = label_components(mask, iterations).flatten(1)  # B x hw
    index = labels.long()  # 0 off the mask, else 1..hw
    sizes = torch.zeros(b, h * w + 1, device=mask.device, dtype=torch.float32)
    sizes = sizes.scatter_add(1, index, (index > 0).to(torch.float32))
    values = torch.arange(h * w + 1, device=mask.device, dtype=torch.float32)
    # Larger first; on a tie, the larger label (the earlier first cell). Label 0 never wins
    # against a real component: its size is zeroed.
    score = (sizes * (h * w + 1) + values) * (values > 0)
    chosen = score.argmax(1, keepdim=True).to(torch.float32)
    return ((labels == chosen) & (labels > 0)).view(b, h, w)


def component_box(component: Tensor) -> Tensor:
    """B x 4 (x0, y0, x1, y1) box of each component in grid cells, ends exclusive.

    An empty component (nothing above the threshold) gives the whole grid: no zoom.
    """
    _, h, w = component.shape
    cells = component.to(torch.float32)
    row_any = cells.amax(2)  # B x h (float: ONNX reduces no booleans)
    rows, cols = row_any > 0, cells.amax(1) > 0  # B x h, B x w
    r = torch.arange(h, device=component.device, dtype=torch.float32)
    c = torch.arange(w, device=component.device, dtype=torch.float32)
    big = float(max(h, w))
    y0 = torch.where(rows, r, big).amin(1)
    y1 = torch.where(rows, r + 1, 0.0).amax(1)
    x0 = torch.where(cols, c, big).amin(1)
    x1 = torch.where(cols, c + 1, 0.0).amax(1)
    box = torch.stack([x0, y0, x1, y1], dim=1)
    whole = torch.tensor([0.0, 0.0, float(w), float(h)], device=component.device)
    empty = row_any.amax(1, keepdim=True) == 0
    return torch.where(empty, whole.expand_as(box), box)


def cells_to_pixels(
    box: Tensor, cell_size: tuple[float, float], image_size: tuple[int, int]
) -> Tensor:
    """Grid-cell boxes (B x 4, xyxy) as pixel boxes: cell edges times the cell size
    (h, w: the patch size, or a CNN's stride), kept inside the image (H, W)."""
    ch, cw = cell_size
    scale = box.new_tensor([cw, ch, cw, ch])
    limit = box.new_tensor([image_size[1], image_size[0], image_size[1], image_size[0]])
    return torch.minimum(box * scale, limit)


def zoom(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Each image's pixel box (B x 4, xyxy, continuous pixel edges) resized to `size`.

    Bilinear, sampled at the output pixel centres as `F.interpolate(crop, size,
    align_corners=False)` samples a crop; a box of the whole image gives the image back.
    One `grid_sample` for the batch (exports to ONNX).
    """
    _, _, height, width = images.shape
    out_h, out_w = size
    boxes = boxes.to(images.dtype)
    ty = (torch.arange(out_h, device=images.device, dtype=images.dtype) + 0.5) / out_h
    tx = (torch.arange(out_w, device=images.device, dtype=images.dtype) + 0.5) / out_w
    ys = boxes[:, 1:2] + ty * (boxes[:, 3:4] - boxes[:, 1:2])  # B x out_h, in pixels
    xs = boxes[:, 0:1] + tx * (boxes[:, 2:3] - boxes[:, 0:1])  # B x out_w
    gy = (ys * (2.0 / height) - 1.0)[:, :, None].expand(-1, -1, out_w)
    gx = (xs * (2.0 / width) - 1.0)[:, None, :].expand(-1, out_h, -1)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def propose_boxes(
    importance: Tensor,
    alpha: float,
    cell_size: tuple[float, float],
    image_size: tuple[int, int],
    iterations: int | None = None,
) -> Tensor:
    """DPPM: B x 4 pixel boxes (xyxy) around the largest component above alpha x mean."""
    component = largest_component(threshold_mask(importance, alpha), iterations)
    return cells_to_pixels(component_box(component), cell_size, image_size)


def draw_boxes(images: Tensor, boxes: Tensor, width: int = 2) -> Tensor:
    """Images with each pixel box (xyxy) outlined in green, `width` pixels inside the edge."""
    _, _, height, w = images.shape
    py = torch.arange(height, device=images.device, dtype=images.dtype)[None] + 0.5
    px = torch.arange(w, device=images.device, dtype=images.dtype)[None] + 0.5
    inside_y = (py > boxes[:, 1:2]) & (py < boxes[:, 3:4])
    inside_x = (px > boxes[:, 0:1]) & (px < boxes[:, 2:3])
    core_y = (py > boxes[:, 1:2] + width) & (py < boxes[:, 3:4] - width)
    core_x = (px > boxes[:, 0:1] + width) & (px < boxes[:, 2:3] - width)
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    core = core_y[:, :, None] & core_x[:, None, :]
    edge = (inside & ~core)[:, None]
    green = images.new_tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    return torch.where(edge, green, images)


# ---- which importance a backbone gives, and its cells in pixels ---------------------------------
def can_rollout(backbone) -> bool:
    """Whether `backbone` is a Vision Transformer whose timm attention blocks can be watched."""
    model = backbone.model
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
    return is_vit and backbone.has_attention()


def has_class_token(backbone) -> bool:
    """Whether a ViT backbone has a class token (rollout's `cls` row)."""
    model = backbone.model
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    return prefix > 0 and getattr(model, "cls_token", None) is not None


def cell_size(
    backbone, kind: str, image_hw: tuple[int, int], grid: tuple[int, int]
) -> tuple[float, float]:
    """Pixels per importance-grid cell: the ViT's patch size (`kind` rollout; a hybrid ViT's
    CNN stride times its patch size), or the CNN's stride when it explains the grid
    (ceil(H / stride) cells), else H / h."""
    model = backbone.model
    if kind == "rollout":
        embed = model.patch_embed
        patch = embed.feat_ratio(as_scalar=False) if hasattr(embed, "feat_ratio") else None
        patch = patch or embed.patch_size
        return float(patch[0]), float(patch[1])
    info = getattr(model, "feature_info", None)
    stride = info[-1].get("reduction") if isinstance(info, list) and info else None
    cells = []
    for side, n in zip(image_hw, grid, strict=True):
        fits = stride and -(-side // stride) == n
        cells.append(float(stride) if fits else side / n)
    return cells[0], cells[1]
