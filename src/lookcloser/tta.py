"""Test-time augmentation: several views of each image, their class probabilities averaged.

A spec names the views: `flip` (each view and its mirror image), `five_crop` (the four corners
and the centre instead of the centre alone) and `scales=224+288` (the whole pipeline at each
input size; default: the model's own). `flip,five_crop,scales=224+288` gives 2 x 5 x 2 = 20
views per image. Each scale resizes the image as evaluation does (shorter side to
size / crop_pct) and crops size x size from it, so a spec of one scale equal to the model's
size and nothing else is exactly the plain evaluation transform. As there, the longer side is
first cut to at most MAX_RESIZE_ASPECT times the shorter (data/transforms.py): the five crops
of a very long image are the corners of that central band, and no view's resize is unbounded.

The views are made here rather than with torchvision's FiveCrop transform so the crops are
boxes one can check (`five_crop_boxes`) and flips are done on the batch, not per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lookcloser.config import MAX_IMAGE_SIZE
from lookcloser.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

# torch, torchvision and timm are imported where the views are made: parsing a spec (the
# config check before training) stays light.

MAX_SCALES = 8  # forward passes per image grow with each scale

SPEC_HELP = (
    "comma-separated: flip, five_crop, scales=S1+S2 (input sizes in pixels), e.g. "
    "flip,five_crop,scales=224+288; none = off"
)


@dataclass(frozen=True)
class TTA:
    """Which test-time views to average: mirrored, five crops, several input sizes."""

    flip: bool = False
    five_crop: bool = False
    scales: tuple[int, ...] = ()  # input sizes; empty = the model's image size

    @classmethod
    def parse(cls, spec: str | TTA | None) -> TTA | None:
        """A spec string as a TTA; None for `none`, an empty string or None."""
        if spec is None or isinstance(spec, TTA):
            return spec
        text = str(spec).strip()
        if text.lower() in ("", "none", "off"):
            return None
        flip = five_crop = False
        scales: tuple[int, ...] = ()
        for item in (part.strip() for part in text.split(",")):
            if item == "flip":
                flip = True
            elif item == "five_crop":
                five_crop = True
            elif item.startswith("scales="):
                try:
                    scales = tuple(int(s) for s in item.removeprefix("scales=").split("+"))
                except ValueError:
                    scales = ()
                # Bounded like data.image_size: a spec may come from a shared model.json.
                if (
                    not scales
                    or min(scales) < 16
                    or max(scales) > MAX_IMAGE_SIZE
                    or len(scales) > MAX_SCALES
                ):
                    raise ConfigError(
                        f"tta: {item[:60]!r}: expected scales=S1+S2 (at most {MAX_SCALES}) with "
                        f"sizes in [16, {MAX_IMAGE_SIZE}] pixels, e.g. scales=224+288"
                    )
            else:
                raise ConfigError(f"tta: unknown item {item!r}; expected {SPEC_HELP}")
        return cls(flip, five_crop, scales)

    def spec(self) -> str:
        """The spec string that parses back to this TTA."""
        items = (["flip"] if self.flip else []) + (["five_crop"] if self.five_crop else [])
        if self.scales:
            items.append("scales=" + "+".join(str(s) for s in self.scales))
        return ",".join(items) or "none"

    def view_count(self) -> int:
        """Views per image (forward passes per image)."""
        return (2 if self.flip else 1) * (5 if self.five_crop else 1) * max(1, len(self.scales))

    def views(self, image_size: int, crop_pct: float, interpolation: str = "bicubic") -> TTAViews:
        """The per-image transform for a model taking `image_size` inputs."""
        return TTAViews(self.scales or (image_size,), self.five_crop, crop_pct, interpolation)


def five_crop_boxes(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the top-left, top-right, bottom-left, bottom-right and
    centre size x size crops of a width x height image (torchvision's FiveCrop order)."""
    if size > width or size > height:
        raise ConfigError(
            f"tta five_crop: crop {size} px is larger than the image {width}x{height}"
        )
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return [
        (0, 0, size, size),
        (width - size, 0, width, size),
        (0, height - size, size, height),
        (width - size, height - size, width, height),
        (left, top, left + size, top + size),
    ]


class TTAViews:
    """PIL image -> one tensor per scale, V x 3 x S x S (V = 5 with five_crop, else 1)."""

    def __init__(
        self, scales: tuple[int, ...], five_crop: bool, crop_pct: float, interpolation: str
    ):
        import torchvision.transforms as T
        from timm.data.transforms import str_to_interp_mode

        from lookcloser.data.transforms import CentralBand

        self.scales = scales
        self.five_crop = five_crop
        # As timm's eval transform: the shorter side to floor(size / crop_pct).
        mode = str_to_interp_mode(interpolation)
        self.resizes = [T.Resize(math.floor(s / crop_pct), interpolation=mode) for s in scales]
        self.band = CentralBand()
        self.to_tensor = T.ToTensor()

    def __call__(self, image: Image.Image) -> list[Tensor]:
        import torch

        image = self.band(image.convert("RGB"))
        views = []
        for size, resize in zip(self.scales, self.resizes, strict=True):
            resized = resize(image)
            boxes = five_crop_boxes(*resized.size, size)
            chosen = boxes if self.five_crop else boxes[-1:]
            # Cropped before the float tensor is made: only the views take 4 bytes a value.
            views.append(torch.stack([self.to_tensor(resized.crop(box)) for box in chosen]))
        return views


def average_probabilities(
    model, views: list[Tensor], flip: bool, meta=None, meta_mask=None
) -> Tensor:
    """B x C class probabilities averaged over every view (and its mirror with `flip`).

    `views`: per scale, B x V x 3 x S x S; `model(images, meta, meta_mask)` gives logits;
    metadata (B x K) is the same for every view of an image.
    """
    import torch

    total, count = None, 0
    for batch in views:
        b, v = batch.shape[:2]
        images = batch.reshape(b * v, *batch.shape[2:])
        m = meta.repeat_interleave(v, dim=0) if meta is not None else None
        mask = meta_mask.repeat_interleave(v, dim=0) if meta_mask is not None else None
        for flipped in (False, True) if flip else (False,):
            x = images.flip(-1) if flipped else images
            # Forward passes of at most b images, as without TTA: the memory a batch needs
            # stays the same, and a CPU runs large batches slower per image.
            logits = torch.cat(
                [
                    model(
                        x[i : i + b], *(t[i : i + b] if t is not None else None for t in (m, mask))
                    )
                    for i in range(0, len(x), b)
                ]
            )
            probs = logits.float().softmax(dim=1).reshape(b, v, -1).sum(dim=1)
            total = probs if total is None else total + probs
            count += v
    return total / count
