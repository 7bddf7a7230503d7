"""WebDataset shards: packing, the index, streaming split across DDP ranks and workers; samplers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lookcloser.data import shards as sh
from lookcloser.data.samplers import sample_weights
from lookcloser.data.sources import DatasetSplits, Sample
from lookcloser.errors import BadImageError, DataError

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def splits(tmp_path) -> DatasetSplits:
    """4 classes: 24 training and 8 test images, each with a unique id in its meta."""
    folder = tmp_path / "images"
    folder.mkdir()

    def make(split: str, n: int) -> list[Sample]:
        samples = []
        for i in range(n):
            path = folder / f"{split}_{i}.{'png' if i % 5 == 0 else 'jpg'}"
            Image.new("RGB", (12 + i, 10), (i * 9 % 256, 50, 90)).save(path)
            meta = {"uid": f"{split}-{i}", "bbox": [1.0, 2.0, 3.0, 4.0], "width": 12.0 + i}
            samples.append(Sample(str(path), i % 4, meta))
        return samples

    return DatasetSplits(["w", "x", "y", "z"], make("train", 24), make("test", 8), "toy", ["bbox"])


def _uids(items) -> list[str]:
    return [meta["uid"] for _, _, meta in items]


def test_pack_writes_webdataset_layout_and_index(splits, tmp_path):
    out = tmp_path / "shards"
    written = sh.pack_shards(splits, out, shard_size=6)
    assert [p.name for p in written] == [f"train-{i:06d}.tar" for i in range(4)] + [
        "test-000000.tar",
        "test-000001.tar",
    ]
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == ["w", "x", "y", "z"] and index["annotations"] == ["bbox"]
    assert (
        index["splits"]["train"]["count"] == 24
        and index["splits"]["train"]["shard_counts"] == [6] * 4
    )
    assert index["splits"]["test"]["class_counts"] == [2, 2, 2, 2]
    with tarfile.open(written[0]) as tar:
        names = tar.getnames()
    assert len(names) == 18
    keys = [n.split(".", 1)[0] for n in names]
    assert keys[0::3] == keys[1::3] == keys[2::3]  # each sample's files are consecutive
    assert {n.split(".", 1)[1] for n in names} <= {"jpg", "png", "cls", "json"}
    # Training samples are shuffled across shards; test samples keep their order.
    train_keys = [k for p in written[:4] for k in _keys(p)]
    assert train_keys != sorted(train_keys) and sorted(train_keys) == [
        f"train_{i:09d}" for i in range(24)
    ]
    assert [k for p in written[4:] for k in _keys(p)] == [f"test_{i:09d}" for i in range(8)]
    assert not list(out.glob("*.partial"))
    with pytest.raises(DataError, match="already holds shards"):
        sh.pack_shards(splits, out, shard_size=6)


def _keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(n.split(".", 1)[0] for n in tar.getnames()))


def test_copied_and_reencoded_samples_decode_to_the_same_label_and_meta(splits, tmp_path):
    sh.pack_shards(splits, tmp_path / "copy", shard_size=32)
    sh.pack_shards(splits, tmp_path / "re", shard_size=32, reencode=True, max_side=8)
    copied = list(sh.iter_tar_samples(str(tmp_path / "copy" / "test-000000.tar")))
    assert copied[0]["png"] == Path(splits.test[0].path).read_bytes()  # bytes copied as they are
    re_encoded = list(sh.iter_tar_samples(str(tmp_path / "re" / "test-000000.tar")))
    image, label, meta = sh.decode_sample(re_encoded[7])
    assert set(re_encoded[7]) == {"__key__", "__url__", "jpg", "cls", "json"}
    assert max(image.size) == 8 and image.mode == "RGB"
    assert label == 3 and meta == {"uid": "test-7", "bbox": [1.0, 2.0, 3.0, 4.0], "width": 19.0}
    record = json.loads(re_encoded[7]["json"])
    assert record["class"] == "z" and record["source"] == splits.test[7].path


def test_open_shards_from_folder_pattern_and_http(splits, tmp_path, http_server):
    out = tmp_path / "shards"
    sh.pack_shards(splits, out, shard_size=6)
    index = sh.open_shards(str(out))
    assert index.counts == {"train": 24, "test": 8} and len(index.urls["train"]) == 4
    subset = sh.open_shards(str(out / "train-{000000..000001}.tar"))
    assert [Path(u).name for u in subset.urls["train"]] == ["train-000000.tar", "train-000001.tar"]
    assert subset.counts["train"] == 12 and subset.counts["test"] == 8
    assert sh.open_shards(str(out / "train-*.tar")).counts["train"] == 24
    for path in out.iterdir():
        http_server.put(f"inat/{path.name}", path.read_bytes())
    remote = sh.open_shards(f"{http_server.url}/inat/")
    assert remote.urls["test"][0] == f"{http_server.url}/inat/test-000000.tar"
    streamed = list(sh.ShardDataset.from_index(remote, "test", with_meta=True))
    assert _uids(streamed) == [f"test-{i}" for i in range(8)]
    info = sh.shard_info(index)
    assert info["splits"]["train"]["per_class"] == {"min": 6, "median": 6.0, "max": 6}
    with pytest.raises(DataError, match="cannot read the shard index"):
        sh.open_shards(str(tmp_path / "nowhere"))


def test_expand_urls():
    assert sh.expand_urls("s/t-{008..010}.tar") == ["s/t-008.tar", "s/t-009.tar", "s/t-010.tar"]
    assert sh.expand_urls("http://h/{a,b}-{0..1}.tar") == [
        "http://h/a-0.tar",
        "http://h/a-1.tar",
        "http://h/b-0.tar",
        "http://h/b-1.tar",
    ]


def test_eval_stream_yields_every_sample_once_across_workers(splits, tmp_path):
    sh.pack_shards(splits, tmp_path, shard_size=5)
    index = sh.open_shards(str(tmp_path))
    dataset = sh.ShardDataset.from_index(index, "train", training=False, with_meta=True)
    assert sorted(_uids(dataset)) == sorted(f"train-{i}" for i in range(24))
    loader = torch.utils.data.DataLoader(
        sh.ShardDataset.from_index(
            index, "train", training=False, with_meta=True, transform=lambda im: torch.zeros(1)
        ),
        batch_size=None,
        num_workers=2,
    )
    seen = [meta["uid"] for _, _, meta in loader]
    assert sorted(seen) == sorted(f"train-{i}" for i in range(24))


def test_training_stream_has_fixed_length_and_reshuffles_each_epoch(splits, tmp_path):
    sh.pack_shards(splits, tmp_path, shard_size=6)
    index = sh.open_shards(str(tmp_path))
    dataset = sh.ShardDataset.from_index(index, "train", shuffle_buffer=8, with_meta=True, seed=3)
    assert len(dataset) == 24
    first = _uids(dataset)
    dataset.set_epoch(1)
    second = _uids(dataset)
    assert len(first) == len(second) == 24
    assert sorted(first) == sorted(second) == sorted(f"train-{i}" for i in range(24))
    assert first != second
    # Rank 1 of 5 gets 24 // 5 samples, cycling its shard when it runs short.
    part = sh.ShardDataset.from_index(index, "train", rank=1, world_size=5, shuffle_buffer=0)
    assert len(part) == 4 and len(list(part)) == 4


def _width(image) -> torch.Tensor:
    return torch.tensor(image.size[0])  # unique per fabricated training image


def test_engine_style_loader_whole_batches_and_epochs_with_persistent_workers(splits, tmp_path):
    sh.pack_shards(splits, tmp_path, shard_size=6)
    index = sh.open_shards(str(tmp_path))
    assert index.meta_keys == ["width"]  # uid is text and bbox a list: not declarable
    dataset = sh.ShardDataset.from_index(
        index, "train", batch_size=5, meta_keys=index.meta_keys, transform=_width, shuffle_buffer=4
    )
    assert len(dataset) == 20
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=5, num_workers=2, persistent_workers=True
    )
    assert len(loader) == 4
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert [tuple(b[0].shape) for b in batches] == [(5,)] * 4
        for widths, _, meta, mask in batches:  # each image's metadata rides with it
            assert meta[:, 0].tolist() == widths.float().tolist() and mask.all()
        epochs.append([w for b in batches for w in b[0].tolist()])
    assert len(set(epochs[0])) == len(set(epochs[1])) == 20
    assert epochs[0] != epochs[1]  # the new epoch reached the persistent workers


def test_bad_image_in_shard_is_skipped_or_raised(splits, tmp_path):
    Path(splits.test[2].path).write_bytes(b"\xff\xd8\xff garbage")
    sh.pack_shards(splits, tmp_path, shard_size=8)
    index = sh.open_shards(str(tmp_path))
    with pytest.raises(BadImageError, match="test_000000002.jpg"):
        list(sh.ShardDataset.from_index(index, "test"))
    kept = sh.ShardDataset.from_index(index, "test", on_bad_image="skip", with_meta=True)
    assert _uids(kept) == [f"test-{i}" for i in range(8) if i != 2]


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch.distributed as dist
    from lookcloser.data import shards as sh
    dist.init_process_group("gloo")
    index = sh.open_shards(sys.argv[1])
    seen = {}
    for mode in ("eval", "train"):
        ds = sh.ShardDataset.from_index(
            index, "train", training=mode == "train", with_meta=True, shuffle_buffer=4)
        seen[mode] = [meta["uid"] for _, _, meta in ds]
    seen["len"] = len(sh.ShardDataset.from_index(index, "train"))
    with open(sys.argv[2], "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_see_disjoint_samples(splits, tmp_path):
    out = tmp_path / "shards"
    sh.pack_shards(splits, out, shard_size=6)
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": str(SRC),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), str(tmp_path / f"rank{rank}.json")],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = {f"train-{i}" for i in range(24)}
    for mode in ("eval", "train"):
        a, b = ranks[0][mode], ranks[1][mode]
        assert len(a) == len(b) == 12 and len(set(a)) == len(set(b)) == 12
        assert not set(a) & set(b), mode
        assert set(a) | set(b) == everything, mode
    assert ranks[0]["len"] == ranks[1]["len"] == 12


# ---- samplers -------------------------------------------------------------------------------
def test_sample_weights_modes():
    labels = [0] * 9 + [1]
    uniform = sample_weights(labels, "uniform")
    assert torch.allclose(uniform, torch.full((10,), 0.1, dtype=torch.float64))
    balanced = class_frequencies(labels, "balanced")
    assert balanced[0] == pytest.approx(0.5) and balanced[1] == pytest.approx(0.5)
    sqrt = class_frequencies(labels, "sqrt")
    assert sqrt[0] / sqrt[1] == pytest.approx(3.0)  # sqrt(9) : sqrt(1)
    weights = sample_weights(labels, "balanced")
    assert weights.sum().item() == pytest.approx(1.0) and weights[9] == pytest.approx(0.5)
    draws = Counter(
        torch.multinomial(
            weights, 4000, replacement=True, generator=torch.Generator().manual_seed(0)
        ).tolist()
    )
    assert 1700 < draws[9] < 2300
    with pytest.raises(DataError, match="data.sampler"):
        sample_weights(labels, "inverse")
    with pytest.raises(DataError, match="no labels"):
        sample_weights([], "balanced")


def test_shard_datamodule_validates_every_val_sample_with_two_workers(splits, tmp_path):
    from lookcloser.engine.datamodule import ShardDataModule

    def datamodule(folder):
        return ShardDataModule(
            sh.open_shards(str(folder)), _width, _width, 3, 2, 0, 4, 10**6, meta_keys=["width"]
        )

    with_val = splits.replace_samples(splits.train, splits.test[:2], val=splits.test)
    sh.pack_shards(with_val, tmp_path / "v", shard_size=3)  # 8 val samples: shards of 3, 3, 2
    assert json.loads((tmp_path / "v" / "dataset.json").read_text())["splits"]["val"]["count"] == 8
    dm = datamodule(tmp_path / "v")
    # Two workers yield 2 + 1 and 1 batches: Lightning would stop at len // batch_size.
    loader = dm.val_dataloader()
    with pytest.raises(TypeError):
        len(loader)  # unsized: Lightning then runs the loader to its end
    widths = [w for batch in loader for w in batch.images.tolist()]
    assert sorted(widths) == sorted(12 + i for i in range(8))
    train = dm.train_dataloader()
    first = [w for batch in train for w in batch.images.tolist()]
    dm.set_epoch(1)
    second = [w for batch in train for w in batch.images.tolist()]
    assert len(first) == len(second) == 24 and first != second
    # Without a val split in the index there is no validation (never the test split).
    sh.pack_shards(splits, tmp_path / "t", shard_size=3)
    assert datamodule(tmp_path / "t").val_dataloader() == []


def class_frequencies(labels: list[int], mode: str) -> dict[int, float]:
    """The share of draws each class gets under `mode` (what the weights amount to per class)."""
    shares: dict[int, float] = {}
    for label, weight in zip(labels, sample_weights(labels, mode).tolist(), strict=True):
        shares[label] = shares.get(label, 0.0) + weight
    return shares
