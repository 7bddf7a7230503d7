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

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lookcloser.data.images import load_image
from lookcloser.data.shards import ShardDataset, ShardIndex
from lookcloser.data.sources import Sample, numeric_meta_keys


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


def drops_last(num_samples: int, batch_size: int) -> bool:
    """Whether a training epoch drops its short last batch: when there are at least two
    batches, or when the short one would hold a single image (BatchNorm cannot train on it)."""
    return num_samples >= 2 * batch_size or (num_samples > 1 and num_samples % batch_size == 1)


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
            drop_last=sampler is not None and drops_last(len(sampler), self.batch_size),
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


class ShardDataModule(L.LightningDataModule):
    """Train and test loaders streaming WebDataset shards (`data.source=shards`).

    Nothing is listed or indexed: the shard index gives classes, shard names and counts.
    Each rank streams its own shards (then each worker its own), reshuffled per epoch through
    `set_epoch`, which FGVCSystem calls at the start of every training epoch. Unlike the
    folder path, a run cannot resume mid-epoch at the exact batch: it restarts that epoch.
    """

    def __init__(
        self,
        index: ShardIndex,
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        max_pixels: int,
        on_bad_image: str = "error",
    ):
        super().__init__()
        common = {"max_pixels": max_pixels, "on_bad_image": on_bad_image}
        self.train_set = ShardDataset.from_index(
            index,
            "train",
            transform=train_transform,
            batch_size=batch_size,
            meta_keys=index.meta_keys,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            **common,
        )
        self.test_set = (
            ShardDataset.from_index(
                index, "test", transform=eval_transform, meta_keys=index.meta_keys, **common
            )
            if index.urls.get("test")
            else None
        )
        self.batch_size = batch_size
        self.num_workers = num_workers

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training shards and buffer for `epoch` (shared with live workers)."""
        self.train_set.set_epoch(epoch)

    def _loader(self, dataset: torch.utils.data.IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; every rank takes the same number of whole batches."""
        trainer = self.trainer
        # Explicit, because DataLoader worker processes cannot ask torch.distributed.
        self.train_set.rank = trainer.global_rank if trainer else 0
        self.train_set.world_size = trainer.world_size if trainer else 1
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        """Test-split batches in shard order, each sample once across ranks and workers."""
        if self.test_set is None:
            return []
        trainer = self.trainer
        self.test_set.rank = trainer.global_rank if trainer else 0
        self.test_set.world_size = trainer.world_size if trainer else 1
        # Unsized: with several workers the batch count is not len / batch_size, and Lightning
        # would stop early at that count, dropping samples.
        return self._loader(_Unsized(self.test_set))


class _Unsized(torch.utils.data.IterableDataset):
    """An iterable dataset without __len__, so loaders run until the stream ends."""

    def __init__(self, dataset: torch.utils.data.IterableDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)
