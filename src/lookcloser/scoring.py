"""A model's outputs over a split of its data: the one evaluation path of training's final
report, `eval` and `compare` (folders, CSVs and datasets through the Predictor, shards
through the same transform, ensembles as the mixture of their members)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lookcloser.config import Config
from lookcloser.data.prepare import SHARDS
from lookcloser.data.sources import build_source
from lookcloser.errors import ConfigError, DataError
from lookcloser.loader import load_model
from lookcloser.predictor import OutputBatch, Predictor, collect_outputs


def split_outputs(predictor: Predictor, cfg: Config, progress: bool, split: str, index, samples):
    """The Predictor's logits over one split of a source or of shards (None if empty); for an
    ensemble, the log of its members' mixture. Whole arrays: `split_stream` streams."""
    stream = split_stream(predictor, cfg, progress, split, index, samples)
    return None if stream is None else collect_outputs(stream, len(predictor.classes))


def split_stream(
    predictor: Predictor, cfg: Config, progress: bool, split: str, index, samples
) -> Iterator[OutputBatch] | None:
    """The Predictor's outputs over one split of a source or of shards, batch by batch (None
    if the split is empty); for an ensemble, the log of its members' mixture per batch."""
    from lookcloser.ensemble import EnsemblePredictor

    if isinstance(predictor, EnsemblePredictor):
        streams = [
            split_stream(member, cfg, progress and i == 0, split, index, samples)
            for i, member in enumerate(predictor.members)
        ]
        return None if streams[0] is None else _mixture(predictor, streams)
    if index is None:
        if not samples:
            return None
        from lookcloser.engine.datamodule import split_boxes

        return predictor.stream_samples(
            samples,
            cfg.data.batch_size,
            cfg.data.num_workers,
            progress,
            f"evaluate {split}",
            boxes=split_boxes(cfg, samples, split),
        )
    if not index.urls.get(split):
        return None
    return _shard_stream(predictor, cfg, progress, split, index)


def _mixture(ensemble, streams: list[Iterator[OutputBatch]]) -> Iterator[OutputBatch]:
    """The members' streams in lockstep (same samples, same batches), mixed batch by batch."""
    for batches in zip(*streams, strict=True):
        yield ensemble.combine_outputs(batches)


def _shard_stream(
    predictor: Predictor, cfg: Config, progress: bool, split: str, index
) -> Iterator[OutputBatch]:
    from torch.utils.data import DataLoader

    from lookcloser.data.shards import ShardDataset

    # The same decoded images and eval transform as the folder path, so the same logits.
    dataset = ShardDataset.from_index(
        index,
        split,
        transform=predictor.item_transform,
        meta_keys=predictor.meta_keys,
        max_pixels=predictor.max_pixels,
        on_bad_image=cfg.data.on_bad_image,
        rank=0,
        world_size=1,
        with_name=True,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        collate_fn=_collate_named,
    )
    # len(loader) counts batches as if one reader made them all; each worker makes its own.
    total = dataset.batch_count(cfg.data.batch_size, cfg.data.num_workers)
    named = _Named(loader)
    batches = iter(named) if total is None else _Counted(named, total)  # no total: none shown
    # Each output's sample name (its packed relative path or source file), in output order:
    # DataLoader workers interleave shards, and skipped images leave gaps.
    for logits, labels in predictor.stream_batches(batches, progress, f"evaluate {split}"):
        yield OutputBatch(logits, labels, named.take(len(labels)))


def _collate_named(items):
    """A Batch of (..., name) items and their names (a module function: workers pickle it)."""
    from lookcloser.data.batch import collate

    return collate([item[:-1] for item in items]), [item[-1] for item in items]


class _Named:
    """The Batches of a loader of (Batch, names) pairs, keeping the names in order."""

    def __init__(self, loader):
        self.loader, self.names = loader, []

    def __iter__(self):
        for batch, names in self.loader:
            self.names.extend(names)
            yield batch

    def take(self, count: int) -> list[str]:
        """The names of the next `count` outputs (the names are not kept after)."""
        taken, self.names = self.names[:count], self.names[count:]
        return taken


class _Counted:
    """A loader with the number of batches it really yields as its length (the progress
    bar's total)."""

    def __init__(self, loader, total: int):
        self.loader, self.total = loader, total

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        return iter(self.loader)


def outputs_on_test(
    model_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    tta: str | None = None,
):
    """The loaded Predictor (or EnsemblePredictor) and its logits, labels and image paths on
    the model's test split (or on data.* overrides); for shards, the paths are the samples'
    names (`data.shards.sample_name`: their packed relative path or source file). Whole
    arrays: `stream_on_test` streams."""
    predictor, stream = stream_on_test(
        model_dir, overrides, progress=progress, device=device, tta=tta
    )
    return predictor, collect_outputs(stream, len(predictor.classes))


def stream_on_test(
    model_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    tta: str | None = None,
) -> tuple[Predictor, Iterator[OutputBatch]]:
    """The loaded Predictor (or EnsemblePredictor) and its outputs on the model's test split
    (or on data.* overrides), batch by batch; every check runs before this returns."""
    from lookcloser.data.prepare import verified

    predictor = load_model(model_dir, device, tta)
    cfg = Config.from_dict(predictor.info["config"])
    for item in overrides or []:
        if not item.startswith("data."):
            raise ConfigError(f"eval takes data.* overrides only, got {item!r}")
        if item.startswith("data.meta_keys="):
            raise ConfigError("eval: data.meta_keys is the model's own; it cannot be overridden")
    cfg.apply_overrides(overrides or [])
    predictor.max_pixels = cfg.data.max_image_pixels  # an override applies to evaluation too
    test, index = [], None
    if cfg.data.source == SHARDS:
        from lookcloser.data.shards import open_shards

        index = open_shards(cfg.data.root)
        check_same_classes(index.classes, predictor.classes)
    else:
        splits = build_source(cfg.data)
        check_same_classes(splits.classes, predictor.classes)
        test = verified(splits.replace_samples([], splits.test, []), cfg.data)[0].test
    stream = split_stream(predictor, cfg, progress, "test", index, test)
    if stream is None:
        raise DataError(f"data.root={cfg.data.root}: no test split to evaluate")
    return predictor, stream


def check_same_classes(data_classes: list[str], model_classes: list[str]) -> None:
    """DataError unless the data's classes are the model's, in the same order."""
    if data_classes != model_classes:
        missing = sorted(set(data_classes) - set(model_classes))
        raise DataError(
            "the data's classes differ from the model's"
            + (f" (not in the model: {', '.join(missing[:5])})" if missing else " (order or names)")
        )
