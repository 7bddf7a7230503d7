"""Evaluating shards: the progress total is the number of batches the DataLoader really makes
(each worker batches its own shards, so 8 images read by 2 workers are 2 batches, not 1)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lookcloser.config import Config
from lookcloser.data import shards as sh
from lookcloser.data.sources import DatasetSplits, Sample
from lookcloser.scoring import split_outputs


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """8 test images packed 4 (2 shards) and 3 (3 shards: 3, 3, 2) to a shard."""
    root = tmp_path_factory.mktemp("shards")
    folder = root / "images"
    folder.mkdir()

    def make(split: str, n: int) -> list[Sample]:
        samples = []
        for i in range(n):
            path = folder / f"{split}_{i}.png"
            Image.new("RGB", (12, 10), (i * 20, 50, 90)).save(path)
            samples.append(Sample(str(path), i % 2))
        return samples

    splits = DatasetSplits(["a", "b"], make("train", 4), make("test", 8), "toy")
    indexes = {}
    for size in (4, 3):
        sh.pack_shards(splits, root / f"by{size}", shard_size=size)
        indexes[size] = sh.open_shards(str(root / f"by{size}"))
    return indexes


def _dataset(index) -> sh.ShardDataset:
    return sh.ShardDataset.from_index(
        index, "test", transform=lambda image: torch.zeros(1), rank=0, world_size=1
    )


@pytest.mark.parametrize("size", [4, 3])
def test_batch_count_is_what_the_loader_yields(packed, size):
    """batch_count matches the batches a DataLoader yields, for 0-3 workers and small and
    large batches; len(DataLoader) undercounts once workers share the shards."""
    dataset = _dataset(packed[size])
    for workers in (0, 1, 2, 3):
        for batch_size in (2, 3, 32):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, num_workers=workers, collate_fn=list
            )
            yielded = list(loader)
            assert sum(len(b) for b in yielded) == 8
            assert dataset.batch_count(batch_size, workers) == len(yielded), (workers, batch_size)
    wide = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=list)
    assert len(wide) == 1 and dataset.batch_count(32, 2) == 2  # the "evaluate val 2/1"


def test_batch_count_unknown_for_training_streams(packed):
    train = sh.ShardDataset.from_index(packed[4], "train", rank=0, world_size=1)
    assert train.batch_count(2, 2) is None


def test_split_stream_gives_the_progress_bar_the_real_total(packed):
    """split_stream hands stream_batches an iterable whose length is the real batch count."""
    seen = {}

    class Recorder:
        item_transform = staticmethod(lambda image: torch.zeros(3, 4, 4))
        meta_keys: list[str] = []
        max_pixels = sh.DEFAULT_MAX_PIXELS
        classes = ["a", "b"]

        def stream_batches(self, batches, progress, description):
            seen["total"], seen["description"] = len(batches), description
            seen["yielded"] = 0
            for batch in batches:
                seen["yielded"] += 1
                yield torch.zeros(len(batch.targets), 2), batch.targets

    cfg = Config.load(None, ["data.batch_size=32", "data.num_workers=2"])
    out = split_outputs(Recorder(), cfg, True, "test", packed[4], [])
    assert seen == {"total": 2, "description": "evaluate test", "yielded": 2}
    assert len(out.labels) == len(out.paths) > 0  # every output named, batch by batch
