"""The data path: resumable per-epoch sampler, per-sample seeded augmentation, collation,
metadata tensors and the unlabelled stream beside the labelled batches."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lookcloser.config import DataConfig
from lookcloser.data.batch import Batch, collate
from lookcloser.data.loading import EpochSampler, ImageDataset
from lookcloser.data.sources import Sample, numeric_meta_keys
from lookcloser.data.transforms import train_transform
from lookcloser.engine.datamodule import FGVCDataModule


# ---- sampler ------------------------------------------------------------------------------
def _draw(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_deterministic_per_seed_and_epoch():
    """Same (seed, epoch) gives the same pairs; other epochs and seeds give other orders."""
    a = _draw(EpochSampler(50, seed=3), 0)
    assert a == _draw(EpochSampler(50, seed=3), 0)
    assert sorted(i for i, _ in a) == list(range(50))
    b = _draw(EpochSampler(50, seed=3), 1)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert {s for _, s in a}.isdisjoint({s for _, s in b})
    assert [i for i, _ in a] != [i for i, _ in _draw(EpochSampler(50, seed=4), 0)]
    assert len({s for _, s in a}) == 50  # one distinct seed per image


def test_sampler_without_shuffle_is_in_order():
    """shuffle=False yields indices in order."""
    assert [i for i, _ in EpochSampler(7, seed=0, shuffle=False)] == list(range(7))


@pytest.mark.parametrize("n", [10, 11])
def test_sampler_ranks_split_the_epoch(n):
    """Two ranks get equal-length slices that together cover every index (padded if odd)."""
    ranks = [EpochSampler(n, seed=5, rank=r, world_size=2) for r in range(2)]
    lists = [_draw(s, 2) for s in ranks]
    assert len(lists[0]) == len(lists[1]) == len(ranks[0]) == -(-n // 2)
    idx0, idx1 = ([i for i, _ in lst] for lst in lists)
    assert set(idx0) | set(idx1) == set(range(n))
    overlap = Counter(idx0 + idx1) - Counter(range(n))
    assert sum(overlap.values()) == 2 * len(idx0) - n  # only the padding repeats
    # Seeds are unique across ranks (position-based), so padded repeats get new augmentations.
    seeds = [s for lst in lists for _, s in lst]
    assert len(set(seeds)) == len(seeds)
    # Every rank's slice follows the single-process order of that epoch.
    single = [i for i, _ in _draw(EpochSampler(n, seed=5), 2)]
    assert idx0 == (single + single)[0 : 2 * len(idx0) : 2]


def test_sampler_pads_every_rank_when_world_exceeds_samples():
    """Every rank yields len(sampler) items even when there are fewer samples than ranks."""
    samplers = [EpochSampler(1, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(list(s)) for s in samplers] == [len(s) for s in samplers] == [1, 1, 1]


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_skip_resumes_exactly(world_size):
    """Skipping k items yields exactly the rest of an uninterrupted epoch, then resets."""
    full = _draw(EpochSampler(23, seed=9, rank=world_size - 1, world_size=world_size), 4)
    resumed = EpochSampler(23, seed=9, rank=world_size - 1, world_size=world_size)
    resumed.resume_at(4, 5)
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # the skip applies once


def test_a_resume_skip_never_leaks_into_the_next_epoch():
    """If the loop moves on to the next epoch before the resumed one is drawn (a checkpoint of
    a finished epoch), that epoch is drawn whole."""
    sampler = EpochSampler(24, seed=3)
    sampler.resume_at(1, 16)
    sampler.set_epoch(2)
    assert len(list(sampler)) == 24


def test_sampler_weighted_drawing():
    """With weights, indices are drawn by weight (zero-weight items never), with replacement."""
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0])
    sampler = EpochSampler(4, seed=0, weights=weights)
    counts = Counter()
    for epoch in range(300):
        pairs = _draw(sampler, epoch)
        assert len(pairs) == 4
        counts.update(i for i, _ in pairs)
    assert set(counts) == {1, 3}
    assert 2.4 < counts[3] / counts[1] < 3.8
    assert _draw(sampler, 7) == _draw(EpochSampler(4, seed=0, weights=weights), 7)


# ---- dataset ------------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path):
    """Three small random RGB PNGs."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _samples(paths):
    return [Sample(p, i % 2, {"x": float(i)}) for i, p in enumerate(paths)]


def _torchvision_transform():
    return T.Compose(
        [T.RandomResizedCrop(24, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()]
    )


def _timm_transform():
    return train_transform(DataConfig(image_size=24, color_jitter=0.4, random_erasing=0.5))


@pytest.mark.parametrize("make", [_torchvision_transform, _timm_transform])
def test_seeded_augmentation_is_reproducible(images, make):
    """The same (index, seed) gives the same tensor whatever was drawn before."""
    dataset = ImageDataset(_samples(images), make(), max_pixels=10**8, meta_keys=["x"])
    first, label, meta, mask = dataset[(1, 1234)]
    assert first.shape == (3, 24, 24)
    assert label == 1 and meta.tolist() == [1.0] and mask.tolist() == [True]
    dataset[(0, 1)], dataset[(2, 99)], dataset[0]  # noqa: B018 (consume randomness)
    torch.manual_seed(77)
    random.seed(77)
    again = dataset[(1, 1234)][0]
    assert torch.equal(first, again)
    others = [dataset[(1, s)][0] for s in range(5)]
    assert any(not torch.equal(first, o) for o in others)


@pytest.mark.parametrize("make", [_torchvision_transform, _timm_transform])
def test_seeded_augmentation_leaves_global_rng_alone(images, make):
    """Drawing a seeded sample does not change the caller's torch or python RNG state."""
    dataset = ImageDataset(_samples(images), make(), max_pixels=10**8)
    torch.manual_seed(5)
    random.seed(5)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    dataset[(0, 42)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_seeded_auto_augment_is_reproducible(images):
    """With data.auto_augment (RandAugment), the same (index, seed) gives the same tensor."""
    cfg = DataConfig(image_size=24, auto_augment="rand-m9-n3-mstd0.5")
    dataset = ImageDataset(_samples(images), train_transform(cfg), max_pixels=10**8)
    results = []
    for numpy_seed in range(6):
        np.random.seed(numpy_seed)
        results.append(dataset[(0, 2024)][0])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_collate_makes_a_typed_batch():
    """Images stack to B x C x H x W, labels to long targets, meta rows to B x K tensors."""
    yes, no = torch.tensor([True, False]), torch.tensor([True, True])
    items = [
        (torch.zeros(3, 4, 4), 0, torch.tensor([1.0, 0.0]), yes),
        (torch.ones(3, 4, 4), 2, torch.tensor([3.0, 4.0]), no),
    ]
    batch = collate(items)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 4, 4) and torch.equal(batch.images[1], torch.ones(3, 4, 4))
    assert batch.targets.dtype == torch.long and batch.targets.tolist() == [0, 2]
    assert batch.meta.tolist() == [[1.0, 0.0], [3.0, 4.0]]
    assert batch.meta_mask.tolist() == [[True, False], [True, True]]
    assert batch.unlabelled is None
    plain = collate([(torch.zeros(3, 2, 2), 1, torch.zeros(0), torch.zeros(0, dtype=torch.bool))])
    assert plain.meta is None and plain.meta_mask is None


def test_numeric_meta_keys():
    """Declarable keys: a number in some sample and a number or missing in every other."""
    samples = [
        Sample("a", 0, {"lat": 1.0, "n": 2, "box": [1, 2, 3, 4], "site": "x", "only": 1.0}),
        Sample("b", 0, {"lat": 2.5, "n": 3, "box": [5.0, 6, 7, 8], "site": "y"}),
        Sample("c", 1, {"lat": float("nan"), "n": 1, "box": [1, 2, 3, 4], "site": "z"}),
    ]
    assert numeric_meta_keys(samples) == ["lat", "n", "only"]
    odd = samples + [Sample("d", 0, {"lat": 0.0, "n": True, "empty": float("nan")})]
    assert numeric_meta_keys(odd) == ["lat", "only"]
    assert numeric_meta_keys([]) == []


def test_dataset_masks_a_missing_value_on_its_own_sample(images):
    """A key missing (absent or NaN) on one sample is masked there; other keys and samples keep
    their values."""
    samples = [
        Sample(images[0], 0, {"lat": 10.0, "lon": 20.0, "site": "a"}),
        Sample(images[1], 1, {"lon": 5.0}),
        Sample(images[2], 0, {"lat": float("nan"), "lon": -1.0}),
    ]
    dataset = ImageDataset(
        samples, T.Compose([T.Resize((8, 8)), T.ToTensor()]), 10**8, ["lat", "lon"]
    )
    tensor, label, meta, mask = dataset[1]
    assert tensor.shape == (3, 8, 8) and label == 1
    assert meta.dtype == torch.float32 and meta.tolist() == [0.0, 5.0]
    assert mask.tolist() == [False, True]
    assert dataset.meta.tolist() == [[10.0, 20.0], [0.0, 5.0], [0.0, -1.0]]
    assert dataset.meta_mask.tolist() == [[True, True], [False, True], [False, True]]
    assert ImageDataset(samples, T.ToTensor(), 10**8).meta.shape == (3, 0)


# ---- the unlabelled stream ------------------------------------------------------------------
def test_sampler_with_length_cycles_through_fresh_permutations():
    """With `length`, a rank yields exactly that many items, every permutation complete."""
    sampler = EpochSampler(5, seed=1, length=12)
    pairs = _draw(sampler, 3)
    assert len(pairs) == len(sampler) == 12
    order = [i for i, _ in pairs]
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert order[:5] != order[5:10]  # the next cycle is a new permutation
    assert pairs == _draw(EpochSampler(5, seed=1, length=12), 3)
    ranks = [_draw(EpochSampler(5, seed=1, length=6, rank=r, world_size=2), 3) for r in (0, 1)]
    assert [i for pair in zip(*ranks, strict=True) for i, _ in pair] == order


def _tiny_datamodule(images, **kwargs) -> FGVCDataModule:
    train = [Sample(images[i % 3], i % 2) for i in range(10)]
    folder = [Sample(p, -1) for p in images]
    to_tensor = T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.ToTensor()])
    return FGVCDataModule(
        train, [], to_tensor, to_tensor, 4, 0, seed=2, max_pixels=10**8, unlabelled=folder, **kwargs
    )


def test_unlabelled_stream_is_drawn_beside_each_batch_and_resumes_exactly(images):
    """Every labelled batch comes with an unlabelled one; resuming after k batches yields the
    uninterrupted epoch's remaining batches, unlabelled images included."""
    dm = _tiny_datamodule(images, unlabelled_batch_size=3)
    loader = dm.train_dataloader()
    dm.unlabelled_sampler.set_epoch(1)
    dm.sampler.set_epoch(1)
    full = [dm.on_before_batch_transfer(b, 0) for b, *_ in loader]
    assert len(full) == len(loader) == 2  # 10 images, batch 4: the short last batch is dropped
    assert all(b.images.shape == (4, 3, 8, 8) for b in full)
    assert all(b.unlabelled.shape == (3, 3, 8, 8) for b in full)
    resumed = _tiny_datamodule(images, unlabelled_batch_size=3)
    resumed.resume_at(1, 1)
    rest = [resumed.on_before_batch_transfer(b, 0) for b, *_ in resumed.train_dataloader()]
    assert len(rest) == 1
    assert torch.equal(rest[0].images, full[1].images)
    assert torch.equal(rest[0].targets, full[1].targets)
    assert torch.equal(rest[0].unlabelled, full[1].unlabelled)
    assert not torch.equal(full[0].unlabelled, full[1].unlabelled)
