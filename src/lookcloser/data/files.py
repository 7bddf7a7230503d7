"""Image files read in batches for inference: each file decoded and transformed in a loader
worker, a bad file reported by position instead of stopping the batch (predict, embed,
enroll)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lookcloser.data.batch import stack_images
from lookcloser.data.boxes import crop_to_box
from lookcloser.data.images import image_errors, load_image
from lookcloser.errors import BadImageError, ConfigError


def check_predict_arguments(top_k: int, batch_size: int, on_bad_image: str) -> None:
    """ConfigError for a bad top_k, batch_size or on_bad_image."""
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")
    if top_k < 1:
        raise ConfigError(f"top_k: expected an integer >= 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size}")


class FileDataset(torch.utils.data.Dataset):
    """Image files for prediction: (position, tensor, None), or (position, None, reason); with
    `boxes` (one per file, data/boxes.py) the tensor is (image, crop)."""

    def __init__(self, files: Sequence[str], transform, max_pixels: int, boxes=None):
        self.files = files
        self.transform = transform
        self.max_pixels = max_pixels
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = load_image(path, self.max_pixels)
            if self.boxes is None:
                with image_errors(path):  # a transform's MemoryError etc.: a bad image
                    return index, self.transform(image), None
        except BadImageError as err:
            return index, None, err.reason
        crop = crop_to_box(image, self.boxes[index], f"{path} (boxes)")
        try:
            with image_errors(path):
                return index, (self.transform(image), self.transform(crop)), None
        except BadImageError as err:
            return index, None, err.reason


def collate_files(items):
    """(positions of good images, their stacked tensors (or (images, crops)), [(path,
    reason)] of bad ones)."""
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, r) for i, t, r in items if t is None]
    if good and isinstance(good[0][1], tuple):
        images = tuple(
            torch.stack(list(parts)) for parts in zip(*(t for _, t in good), strict=True)
        )
    else:
        images = stack_images([t for _, t in good]) if good else torch.empty(0)
    return [i for i, _ in good], images, bad


def file_loader(
    files: Sequence[str],
    transform,
    max_pixels: int,
    batch_size: int,
    num_workers: int = 0,
    boxes=None,
) -> torch.utils.data.DataLoader:
    """Batches of `collate_files` over image files, in their order (predict, embed, enroll)."""
    return torch.utils.data.DataLoader(
        FileDataset(files, transform, max_pixels, boxes),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_files,
    )
