"""From samples to batches: datasets, the resumable sampler and the LightningDataModule.

Reproducibility is built into the data path rather than left to worker RNG: the sampler
hands out (index, seed) pairs, where the seed depends only on (run seed, epoch, index), and
the dataset draws that image's augmentation from it. So an epoch's batches are the same
whatever the number of workers or processes, and a run resumed mid-epoch sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lookcloser.data.images import load_image
from lookcloser.data.sources import Sample


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image in one epoch (SplitMix64-style mixing of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


class ImageDataset(Dataset):
    """Decodes and transforms samples; returns (image, label, numeric metadata)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, max_pixels: int):
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.meta_keys = numeric_meta_keys(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.samples[index]
        image = load_image(sample.path, self.max_pixels)
        if seed is None:
            tensor = self.transform(image)
        else:
            # Augmentation drawn from this image's own seed (python, numpy and torch RNGs: timm
            # uses all three), leaving the caller's RNG state alone.
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[]):
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    torch.manual_seed(seed)
                    tensor = self.transform(image)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        meta = {
            k: torch.tensor(sample.meta.get(k, math.nan), dtype=torch.float32)
            for k in self.meta_keys
        }
        return tensor, sample.label, meta


def numeric_meta_keys(samples: Sequence[Sample]) -> list[str]:
    """Metadata keys whose values are numbers (or fixed-length number lists) in every sample."""
    if not samples:
        return []
    keys = set(samples[0].meta)
    for s in samples:
        keys &= set(s.meta)
    numeric = []
    for key in sorted(keys):
        shapes = {_numeric_shape(s.meta[key]) for s in samples}
        if len(shapes) == 1 and None not in shapes:
            numeric.append(key)
    return numeric


def _numeric_shape(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return 0
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return len(value)
    return None


class EpochSampler(Sampler):
    """Seeded shuffling (or weighted drawing) per epoch, split across DDP ranks, resumable.

    Yields (index, seed) pairs. Every rank draws the same permutation and takes its own
    slice, padded to equal length so all ranks step together.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.weights = weights
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # items to skip once, when resuming mid-epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to draw (Lightning calls this each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        if self.weights is not None:
            order = torch.multinomial(
                self.weights, self.num_samples, replacement=True, generator=gen
            )
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        order = order.tolist()
        total = len(self) * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]  # pad: every rank gets len(self)
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        start, self.skip = self.skip, 0
        for position in range(start, len(order)):
            index = order[position]
            yield index, sample_seed(self.seed, self.epoch, position * self.world_size + self.rank)


def collate(batch):
    """Stack images, labels and metadata tensors."""
    images, labels, metas = zip(*batch, strict=True)
    meta = {k: torch.stack([m[k] for m in metas]) for k in metas[0]} if metas[0] else {}
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), meta


class FGVCDataModule(L.LightningDataModule):
    """Train and test loaders over in-memory sample lists."""

    def __init__(
        self,
        train: Sequence[Sample],
        test: Sequence[Sample],
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int,
        num_workers: int,
        seed: int,
        max_pixels: int,
        weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.train_set = ImageDataset(train, train_transform, max_pixels)
        self.test_set = ImageDataset(test, eval_transform, max_pixels)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.weights = weights
        self.sampler: EpochSampler | None = None
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the next training iteration at this epoch, after `batches_done` batches."""
        self._resume = (epoch, batches_done)

    def _loader(self, dataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=sampler is not None and len(sampler) >= 2 * self.batch_size,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or weighted), DDP-split, resumable training batches."""
        trainer = self.trainer
        self.sampler = EpochSampler(
            len(self.train_set),
            self.seed,
            weights=self.weights,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        if self._resume is not None:
            epoch, batches_done = self._resume
            self.sampler.set_epoch(epoch)
            self.sampler.skip = batches_done * self.batch_size
            self._resume = None
        return self._loader(self.train_set, self.sampler)

    def val_dataloader(self) -> DataLoader:
        """Test-split batches in file order (validation during training)."""
        return self._loader(self.test_set)
