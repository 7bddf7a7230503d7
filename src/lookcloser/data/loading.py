"""From samples to batch items: the image dataset and the resumable, seeded sampler.

Reproducibility is built into the data path rather than left to worker RNG: the sampler
hands out (index, seed) pairs, where the seed depends only on (run seed, epoch, position),
and the dataset draws that image's augmentation from it. So an epoch's batches are the same
whatever the number of workers or processes, and a run resumed mid-epoch sees exactly the
batches an uninterrupted run would have seen. Training (engine/) and the Predictor both read
images through here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lookcloser.data.boxes import Box, crop_to_box
from lookcloser.data.images import image_errors, load_image
from lookcloser.data.meta import meta_tensors
from lookcloser.data.sources import Sample
from lookcloser.data.table import FieldView, SampleTable, sample_paths


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image in one epoch (SplitMix64-style mixing of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


class ImageDataset(Dataset):
    """Decodes and transforms samples; items are (image, label, meta values, meta mask) and,
    with `boxes` (one `[x, y, w, h]` or None per sample, data/boxes.py), the object crop: the
    box cut from the original image, through the same transform (whole image for None).

    The metadata of `meta_keys` is encoded once here (K values and a K mask per sample, see
    data.meta), so a non-numeric value fails before training rather than in a worker.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        max_pixels: int,
        meta_keys: Sequence[str] = (),
        boxes: Sequence[Box | None] | None = None,
        box_source: str = "boxes",
    ):
        # A SampleTable stays one (arrays, not an object per sample for workers to copy).
        self.samples = samples if isinstance(samples, SampleTable) else list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.meta_keys = list(meta_keys)
        if boxes is not None and len(boxes) != len(self.samples):
            raise ValueError(f"{len(boxes)} boxes for {len(self.samples)} samples")
        self.boxes = boxes
        self.box_source = box_source  # names the boxes' origin in errors
        self.meta, self.meta_mask = meta_tensors(
            FieldView(self.samples, "meta"), self.meta_keys, sample_paths(self.samples)
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.samples[index]
        image = load_image(sample.path, self.max_pixels)
        if seed is None:
            tensor = self._transform(image, index)
        else:
            # Augmentation drawn from this image's own seed (python, numpy and torch RNGs: timm
            # uses all three), leaving the caller's RNG state alone.
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[]):
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    torch.manual_seed(seed)
                    tensor = self._transform(image, index)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        if self.boxes is None:
            return tensor, sample.label, self.meta[index], self.meta_mask[index]
        tensor, crop = tensor
        return tensor, sample.label, self.meta[index], self.meta_mask[index], crop

    def _transform(self, image, index: int):
        """The image's tensor, or (image, crop) tensors with boxes (the crop drawn second)."""
        path = self.samples[index].path
        with image_errors(path):  # a transform's MemoryError etc. names the file
            if self.boxes is None:
                return self.transform(image)
            crop = crop_to_box(image, self.boxes[index], f"{path} ({self.box_source})")
            return self.transform(image), self.transform(crop)


class EpochSampler(Sampler):
    """Seeded shuffling (or weighted drawing) per epoch, split across DDP ranks, resumable.

    Yields (index, seed) pairs. `weights` (drawing with replacement) may be a function of the
    epoch, for runs whose sampler changes between stages. Every rank draws the same permutation and takes its own
    slice, padded to equal length so all ranks step together. With `length`, each rank yields
    exactly that many items per epoch, drawn from successive permutations (a stream sized to
    another loader's epoch, such as the unlabelled images beside the labelled batches).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        weights: torch.Tensor | Callable[[int], torch.Tensor | None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        length: int | None = None,
    ):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.weights = weights
        self.rank = rank
        self.world_size = world_size
        self.length = length
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items already done) to skip once

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to draw (Lightning calls this each epoch)."""
        self.epoch = epoch

    def resume_at(self, epoch: int, items_done: int) -> None:
        """Continue `epoch` after its first `items_done` items. The skip belongs to that epoch
        only: if the loop moves on to the next one first, nothing of that one is skipped."""
        self.set_epoch(epoch)
        self._resume = (epoch, items_done)

    def __len__(self) -> int:
        if self.length is not None:
            return self.length
        return math.ceil(self.num_samples / self.world_size)

    def _draw(self, cycle: int, count: int) -> list[int]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 - cycle))
        weights = self.weights(self.epoch) if callable(self.weights) else self.weights
        if weights is not None:
            return torch.multinomial(weights, count, replacement=True, generator=gen).tolist()
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=gen).tolist()
        return list(range(self.num_samples))

    def _order(self) -> list[int]:
        total = len(self) * self.world_size
        if self.length is None:
            order = self._draw(0, self.num_samples)
            order = (order * math.ceil(total / len(order)))[:total]  # pad: every rank gets len
        else:
            order, cycle = [], 0
            while len(order) < total:
                order += self._draw(cycle, total)
                cycle += 1
            order = order[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        resume, self._resume = self._resume, None
        start = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for position in range(start, len(order)):
            index = order[position]
            yield index, sample_seed(self.seed, self.epoch, position * self.world_size + self.rank)


def drops_last(num_samples: int, batch_size: int) -> bool:
    """Whether a training epoch drops its short last batch: when there are at least two
    batches, or when the short one would hold a single image (BatchNorm cannot train on it)."""
    return num_samples >= 2 * batch_size or (num_samples > 1 and num_samples % batch_size == 1)
