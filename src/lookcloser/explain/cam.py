"""Grad-CAM over a method's own feature map.

Written here rather than taken from the grad-cam package: every Method already exposes
its feature map and head (`forward_features` / `forward_head`), so no target-layer lookup
or forward hooks are needed, and it works unchanged for CNN maps and ViT token grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lookcloser.models.modes import eval_mode


def grad_cam(
    method,
    images: Tensor,
    target: Tensor | None = None,
    meta: Tensor | None = None,
    meta_mask: Tensor | None = None,
) -> Tensor:
    """B x H x W maps in [0, 1]: ReLU of the gradient-weighted feature channels, upsampled.

    The metadata, for methods that take it, enters the head as in `forward`, so the map
    explains the same logits the model gives.
    """
    with eval_mode(method), torch.enable_grad():
        images = images.detach()
        features = method.forward_features(images)
        logits = method.forward_head(features, meta, meta_mask)
        if target is None:
            target = logits.argmax(dim=1)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, features)
    # With crop fusion the map holds the images' rows, then their crops' (models/crops.py):
    # the first B rows are the images'.
    b = images.shape[0]
    spatial = method.backbone.spatial_map
    fmap, gmap = spatial(features.detach()[:b]), spatial(grads[:b])
    weights = gmap.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(cam)


def normalize_maps(maps: Tensor) -> Tensor:
    """Scale each map to [0, 1] (a flat map becomes all zeros)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)
