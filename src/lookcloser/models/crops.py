"""Object-crop fusion (`model.crop_fusion=concat|add`): the image and a crop of its object go
through the same backbone; their pooled features are joined before the class head.

How it fits the Method contract without a method of its own: with crop fusion,
`Method.forward_features(images, crops)` returns the images' feature maps followed by their
crops' (2B rows, `fused_features`), and the class head from `make_head` is a `CropFusedHead`,
which takes the 2B pooled rows and joins row i with row B + i (concat: [image, crop], 2D
wide; add: image + crop) before the classifier. So `forward_head`, Grad-CAM (which keeps the
first B maps: the image's) and ONNX export need no change, and a method whose class decision
is `head(pool(features))` composes with crop fusion by config.

Where the crop comes from:

* given (`crops`): cut from the original image by the data path (data/boxes.py), from a
  box of the dataset or a box file, at the original resolution;
* else from the model's attention, inside the graph (exports to ONNX): the class activation
  map of the class the image branch predicts (CNNs) or the attention rollout (ViTs),
  thresholded at `crop_alpha` x its mean, largest connected region, its box zoomed from the
  input tensor (models/zoom.py). Box selection runs without gradient and the crop is cut
  from detached pixels: the loss trains the backbone and head through both branches, never
  the choice of the box.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lookcloser.errors import ConfigError
from lookcloser.models.zoom import (
    RolloutAccumulator,
    can_rollout,
    cell_size,
    class_activation_map,
    has_class_token,
    propose_boxes,
    rollout_importance,
    zoom,
)

CROP_FUSIONS = ("concat", "add")


class CropFusedHead(nn.Module):
    """Joins each image's pooled features with its crop's, then classifies.

    Input: 2B x D rows (the images', then their crops'); concat: [x_image, x_crop] (2D);
    add: x_image + x_crop (D). The classifier may itself fuse metadata (`takes_meta`).
    """

    takes_meta = True

    def __init__(self, mode: str, classifier: nn.Module):
        super().__init__()
        if mode not in CROP_FUSIONS:
            raise ConfigError(
                f"model.crop_fusion: expected none, {', '.join(CROP_FUSIONS)}, got {mode!r}"
            )
        self.mode = mode
        self.classifier = classifier

    def fuse(self, image: Tensor, crop: Tensor) -> Tensor:
        """The joined embedding of image and crop features (... x D each)."""
        return torch.cat([image, crop], dim=-1) if self.mode == "concat" else image + crop

    def _classify(self, x: Tensor, meta=None, meta_mask=None) -> Tensor:
        if getattr(self.classifier, "takes_meta", False):
            return self.classifier(x, meta, meta_mask)
        return self.classifier(x)

    def forward(
        self, x: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        half = x.shape[0] // 2
        return self._classify(self.fuse(x[:half], x[half:]), meta, meta_mask)

    def image_logits(self, x: Tensor) -> Tensor:
        """Logits of image features alone (... x D), the crop's part 0 and no metadata: what
        chooses the attention box's class and, per location, its class activation map."""
        return self._classify(self.fuse(x, torch.zeros_like(x)))


def crop_head(method: nn.Module) -> CropFusedHead:
    """The method's crop-fused class head (exactly one: the class decision crops join)."""
    heads = [m for m in method.modules() if isinstance(m, CropFusedHead)]
    if len(heads) != 1:
        raise ConfigError(
            f"model.crop_fusion: method {getattr(method, 'name', '?')!r} has {len(heads)} class "
            "heads; crop fusion needs a method with one class head on pooled backbone features"
        )
    return heads[0]


def attention_kind(backbone) -> str:
    """How a backbone's attention boxes are found: rollout on a ViT, else cam."""
    return "rollout" if can_rollout(backbone) else "cam"


def image_features_and_boxes(method, images: Tensor) -> tuple[Tensor, Tensor]:
    """The images' feature map and each image's attention box (B x 4, xyxy pixels of the
    input), chosen without gradient."""
    backbone = method.backbone
    size = tuple(images.shape[-2:])
    kind = attention_kind(backbone)
    if kind == "rollout":
        accumulator = RolloutAccumulator()  # folds the blocks' attention in, without grad
        with backbone.watch_attention(accumulator):
            features = backbone.forward_features(images)
        grid = tuple(backbone.spatial_map(features).shape[-2:])
        prefix = int(getattr(backbone.model, "num_prefix_tokens", 0))
        query = "cls" if has_class_token(backbone) else "mean"
        importance = rollout_importance(accumulator.rollout, prefix, grid, query)
    else:
        features = backbone.forward_features(images)
        with torch.no_grad():
            head = crop_head(method)
            detached = features.detach()
            classes = head.image_logits(backbone.pool(detached)).argmax(1)
            fmap = backbone.spatial_map(detached)
            importance = class_activation_map(fmap, head.image_logits, classes)
    with torch.no_grad():
        grid = tuple(importance.shape[-2:])
        boxes = propose_boxes(
            importance, method.crop_alpha, cell_size(backbone, kind, size, grid), size
        )
    return features, boxes


def attention_crops(method, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(image features, attention boxes, crops): each box of the detached images resized to
    the input size."""
    features, boxes = image_features_and_boxes(method, images)
    with torch.no_grad():
        crops = zoom(images.detach(), boxes, tuple(images.shape[-2:]))
    return features, boxes, crops


def fused_features(method, images: Tensor, crops: Tensor | None = None) -> Tensor:
    """The images' feature maps, then their crops' (2B rows): `crops` as given (from boxes of
    the data, B x 3 x H x W like `images`), else from the model's attention."""
    if crops is None:
        features, _, crops = attention_crops(method, images)
    else:
        if crops.shape != images.shape:
            raise ConfigError(
                f"crops: expected one crop per image shaped like the images "
                f"{tuple(images.shape)}, got {tuple(crops.shape)}"
            )
        features = method.backbone.forward_features(images)
    return torch.cat([features, method.backbone.forward_features(crops)])
