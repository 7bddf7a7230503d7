"""The LightningDataModules: training and validation batches from samples or from shards.

`build_datamodule` is the one place that chooses between them. Both serve `Batch` objects
(data/batch.py): the labelled batch and, with `data.unlabelled`, the unlabelled images drawn
beside it (a Lightning CombinedLoader, merged back into one Batch before it reaches the
system). The test split never enters a datamodule: it is read once, after training, by the
Predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lookcloser.config import Config
from lookcloser.data.batch import Batch, collate
from lookcloser.data.loading import EpochSampler, ImageDataset, drops_last, sample_seed
from lookcloser.data.prepare import TrainingData
from lookcloser.data.shards import ShardDataset, ShardIndex
from lookcloser.data.sources import Sample
from lookcloser.data.table import sample_labels
from lookcloser.errors import ConfigError


def build_datamodule(
    cfg: Config,
    data: TrainingData,
    train_transform: Callable,
    eval_transform: Callable,
    unlabelled_transform: Callable | None = None,
) -> L.LightningDataModule:
    """The datamodule for prepared data: streamed shards or in-memory samples.

    The unlabelled stream uses `unlabelled_transform` (e.g. two views for FixMatch), else
    the training transform.
    """
    d = cfg.data
    common = {
        "batch_size": d.batch_size,
        "num_workers": d.num_workers,
        "seed": cfg.seed,
        "max_pixels": d.max_image_pixels,
        "meta_keys": d.meta_keys,
        "unlabelled": data.unlabelled,
        "unlabelled_batch_size": d.unlabelled_batch_size or d.batch_size,
        "unlabelled_transform": unlabelled_transform,
    }
    if data.index is not None:
        if any(s.sampler not in (None, "uniform") for s in cfg.optim.stages):
            raise ConfigError(
                "optim.stages: a stage's sampler needs in-memory samples; streamed shards "
                "(data.source=shards) are drawn in shard order"
            )
        return ShardDataModule(
            data.index,
            train_transform,
            eval_transform,
            shuffle_buffer=d.shuffle_buffer,
            on_bad_image=d.on_bad_image,
            **common,
        )
    weights = _sampling_weights(cfg, sample_labels(data.train).tolist())  # no Sample built
    return FGVCDataModule(
        data.train,
        data.val,
        train_transform,
        eval_transform,
        weights=weights,
        boxes=(split_boxes(cfg, data.train, "train"), split_boxes(cfg, data.val, "val")),
        **common,
    )


def split_boxes(cfg: Config, samples: Sequence[Sample], split: str) -> list | None:
    """The crop-fusion boxes of a split's samples (data.boxes for train, data.test_boxes for
    val and test; data/boxes.py), or None when the crops come from the model's attention."""
    from lookcloser.data.boxes import sample_boxes

    if cfg.model.crop_fusion == "none" or not samples:
        return None
    key = "boxes" if split == "train" else "test_boxes"
    paths = [s.path for s in samples]
    return sample_boxes(
        paths, getattr(cfg.data, key), [s.meta for s in samples], f"data.{key}", split
    )


def _sampling_weights(
    cfg: Config, labels: list[int]
) -> torch.Tensor | Callable[[int], torch.Tensor | None] | None:
    """The training sampler's weights: None (uniform), one tensor, or per epoch when
    `optim.stages` change the sampler (e.g. class-balanced in the second stage)."""
    from lookcloser.data.samplers import sample_weights

    modes, start = [], 0  # (first epoch, sampler) of each stage
    for stage in cfg.optim.stages:
        modes.append((start, stage.sampler or cfg.data.sampler))
        start += stage.epochs
    modes = modes or [(0, cfg.data.sampler)]
    weights = {m: None if m == "uniform" else sample_weights(labels, m) for _, m in modes}
    if len(weights) == 1:
        return next(iter(weights.values()))

    def for_epoch(epoch: int) -> torch.Tensor | None:
        mode = next(m for first, m in reversed(modes) if epoch >= first)
        return weights[mode]

    return for_epoch


class _Batches(L.LightningDataModule):
    """What both datamodules share: loaders of Batches and the unlabelled stream beside them."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        seed: int,
        unlabelled: ImageDataset | None,
        unlabelled_batch_size: int,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.unlabelled_set = unlabelled
        self.unlabelled_batch_size = unlabelled_batch_size
        self.unlabelled_sampler: EpochSampler | None = None

    def _loader(
        self, dataset, sampler=None, batch_size: int | None = None, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _with_unlabelled(
        self, labelled: DataLoader, batches: int, epoch: int | None = None, skip: int = 0
    ) -> DataLoader | CombinedLoader:
        """The labelled loader, or it combined with an unlabelled stream of `batches` batches.

        The unlabelled sampler is sized to the labelled epoch, so both end together and a
        mid-epoch resume skips the same number of batches in each.
        """
        if self.unlabelled_set is None:
            return labelled
        rank, world = self._rank_world()
        size = self.unlabelled_batch_size
        self.unlabelled_sampler = EpochSampler(
            len(self.unlabelled_set),
            sample_seed(self.seed, 0, -3),  # a stream of its own, not the labelled order
            rank=rank,
            world_size=world,
            length=batches * size,
        )
        if epoch is not None:
            self.unlabelled_sampler.resume_at(epoch, skip * size)
        unlabelled = self._loader(self.unlabelled_set, self.unlabelled_sampler, size)
        # Equal lengths by construction. "min_size" ends the epoch when both are exhausted
        # without restarting either ("max_size_cycle" would re-open the labelled loader for
        # one discarded batch at every epoch end).
        return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, mode="min_size")

    def on_before_batch_transfer(self, batch, dataloader_idx: int) -> Batch:
        """One Batch: the labelled batch with the unlabelled images drawn beside it."""
        if isinstance(batch, dict):
            images = batch["unlabelled"].images
            if images.ndim == 5:  # U x 2 x 3 x H x W: a weak and a strong view (TwoViews)
                return batch["labelled"].replace(
                    unlabelled=images[:, 0], unlabelled_strong=images[:, 1]
                )
            return batch["labelled"].replace(unlabelled=images)
        return batch


def _unlabelled_set(
    samples: Sequence[Sample], transform: Callable, max_pixels: int
) -> ImageDataset | None:
    return ImageDataset(samples, transform, max_pixels) if samples else None


class FGVCDataModule(_Batches):
    """Training and validation loaders over in-memory sample lists."""

    def __init__(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample],
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int,
        num_workers: int,
        seed: int,
        max_pixels: int,
        weights: torch.Tensor | Callable[[int], torch.Tensor | None] | None = None,
        meta_keys: Sequence[str] = (),
        unlabelled: Sequence[Sample] = (),
        unlabelled_batch_size: int | None = None,
        unlabelled_transform: Callable | None = None,
        boxes: tuple[list | None, list | None] = (None, None),
    ):
        super().__init__(
            batch_size,
            num_workers,
            seed,
            _unlabelled_set(unlabelled, unlabelled_transform or train_transform, max_pixels),
            unlabelled_batch_size or batch_size,
        )
        # boxes: (train, val) crop-fusion boxes per sample, None for attention crops.
        self.train_set = ImageDataset(
            train, train_transform, max_pixels, meta_keys, boxes[0], "data.boxes"
        )
        self.val_set = ImageDataset(
            val, eval_transform, max_pixels, meta_keys, boxes[1], "data.test_boxes"
        )
        self.weights = weights
        self.sampler: EpochSampler | None = None
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the next training iteration at this epoch, after `batches_done` batches."""
        self._resume = (epoch, batches_done)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Shuffled (or weighted), DDP-split, resumable training batches (+ unlabelled)."""
        rank, world = self._rank_world()
        self.sampler = EpochSampler(
            len(self.train_set), self.seed, weights=self.weights, rank=rank, world_size=world
        )
        epoch, skip = None, 0
        if self._resume is not None:
            epoch, skip = self._resume
            self.sampler.resume_at(epoch, skip * self.batch_size)
            self._resume = None
        drop = drops_last(len(self.sampler), self.batch_size)
        labelled = self._loader(self.train_set, self.sampler, drop_last=drop)
        return self._with_unlabelled(labelled, len(labelled), epoch, skip)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in sample order (never the test split)."""
        return self._loader(self.val_set) if len(self.val_set) else []


class ShardDataModule(_Batches):
    """Training and validation loaders streaming WebDataset shards (`data.source=shards`).

    Nothing is listed or indexed: the shard index gives classes, shard names and counts.
    Each rank streams its own shards (then each worker its own), reshuffled per epoch through
    `set_epoch`, which FGVCSystem calls at the start of every training epoch. Unlike the
    folder path, a run cannot resume mid-epoch at the exact batch: it restarts that epoch.
    Validation reads the index's `val` split; without one there is none.
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
        meta_keys: Sequence[str] = (),
        unlabelled: Sequence[Sample] = (),
        unlabelled_batch_size: int | None = None,
        unlabelled_transform: Callable | None = None,
    ):
        super().__init__(
            batch_size,
            num_workers,
            seed,
            _unlabelled_set(unlabelled, unlabelled_transform or train_transform, max_pixels),
            unlabelled_batch_size or batch_size,
        )
        common = {
            "max_pixels": max_pixels,
            "on_bad_image": on_bad_image,
            "meta_keys": list(meta_keys),
        }
        self.train_set = ShardDataset.from_index(
            index,
            "train",
            transform=train_transform,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            **common,
        )
        self.val_set = (
            ShardDataset.from_index(index, "val", transform=eval_transform, **common)
            if index.urls.get("val")
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training shards and buffer for `epoch` (shared with live workers)."""
        self.train_set.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Shuffled training batches; every rank takes the same number of whole batches."""
        # Explicit, because DataLoader worker processes cannot ask torch.distributed.
        self.train_set.rank, self.train_set.world_size = self._rank_world()
        labelled = self._loader(self.train_set)
        return self._with_unlabelled(labelled, len(self.train_set) // self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Val-split batches in shard order, each sample once across ranks and workers."""
        if self.val_set is None:
            return []
        self.val_set.rank, self.val_set.world_size = self._rank_world()
        # Unsized: with several workers the batch count is not len / batch_size, and Lightning
        # would stop early at that count, dropping samples.
        return self._loader(_Unsized(self.val_set))


class _Unsized(torch.utils.data.IterableDataset):
    """An iterable dataset without __len__, so loaders run until the stream ends."""

    def __init__(self, dataset: torch.utils.data.IterableDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)
