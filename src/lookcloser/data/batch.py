"""The typed batch every data path produces and every method's `training_losses` receives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """One training or evaluation batch.

    `meta` holds the model's declared metadata (`data.meta_keys`, in that order) with 0 where
    a sample lacks a value, and `meta_mask` says which values are present; both are None for
    image-only models. `unlabelled` holds the images of the unlabelled stream
    (`data.unlabelled`) drawn next to this batch, or None; `unlabelled_strong` the same images
    under strong augmentation when the stream delivers two views (`semi.strategy=fixmatch`).
    `crops` holds each image's object crop cut from a box of the data (`data.boxes=dataset` or
    a box file, for `model.crop_fusion`), transformed like the image; None otherwise.
    """

    images: Tensor  # B x 3 x H x W, RGB in [0, 1] (evaluation with TTA: data.batch.stack_images)
    targets: Tensor  # B class indices, or B x C class probabilities under mixup / cutmix
    meta: Tensor | None = None  # B x K float32
    meta_mask: Tensor | None = None  # B x K bool, True where the value is present
    unlabelled: Tensor | None = None  # U x 3 x H x W
    unlabelled_strong: Tensor | None = None  # U x 3 x H x W: the same images, strongly augmented
    crops: Tensor | None = None  # B x 3 x H x W: object crops from boxes of the data

    def __len__(self) -> int:
        return self.images.shape[0]

    def replace(self, **changes) -> Batch:
        """A copy with some fields changed (e.g. mixed images and soft targets)."""
        return replace(self, **changes)

    def pin_memory(self) -> Batch:
        """The batch in pinned memory (DataLoader's pin_memory calls this)."""
        return replace(
            self,
            **{
                f.name: value.pin_memory()
                for f in fields(self)
                if isinstance(value := getattr(self, f.name), Tensor)
            },
        )


def stack_images(images: Sequence[Tensor | list[Tensor]]) -> Tensor | list[Tensor]:
    """Stack images (3 x H x W each) into B x 3 x H x W; test-time views (a list per image,
    one V x 3 x S x S tensor per scale) into one B x V x 3 x S x S tensor per scale."""
    if isinstance(images[0], Tensor):
        return torch.stack(list(images))
    return [torch.stack(list(scale)) for scale in zip(*images, strict=True)]


def collate(items: Sequence[tuple[Tensor, ...]]) -> Batch:
    """Stack (image, label, meta values, meta mask[, crop]) items into a Batch (meta None
    when K = 0; crops None without a fifth element)."""
    images, labels, values, masks, *crops = zip(*items, strict=True)
    has_meta = values[0].numel() > 0
    return Batch(
        stack_images(images),
        torch.tensor(labels, dtype=torch.long),
        torch.stack(values) if has_meta else None,
        torch.stack(masks) if has_meta else None,
        crops=torch.stack(crops[0]) if crops else None,
    )
