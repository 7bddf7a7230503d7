"""Every benchmark source end to end: fabricated official archives served on 127.0.0.1,
download -> verify -> extract -> load -> a 1-epoch train; and the `data` CLI with shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lookcloser import api, cli
from lookcloser.config import DataConfig
from lookcloser.data import download as dl
from lookcloser.data.sources import build_source

# The fabricated releases live with the unit tests of the loaders; reuse them, not copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_fgvc_datasets as fab  # noqa: E402

TINY = [
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.crop_pct=1.0",
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "trainer.epochs=1",
    "trainer.val_every_n_epochs=0",
]


def _download(name: str, root: Path, http_server, monkeypatch) -> dl.DownloadSpec:
    """Serve the fabricated release and prepare `root` as a user would (manual files too)."""
    files = fab.CASES[name][1]()
    spec = fab._prepare(name, files, http_server, monkeypatch)
    if spec.manual:
        root.mkdir()
        for filename, data in files.items():
            (root / filename).write_bytes(data)
    dl.download_dataset(name, root, mirror=http_server.url)
    return spec


@pytest.mark.parametrize("name", list(fab.CASES))
def test_download_load_and_train_one_epoch(name, http_server, tmp_path, monkeypatch):
    source, _, check = fab.CASES[name]
    root = tmp_path / name
    _download(name, root, http_server, monkeypatch)
    splits = build_source(DataConfig(source=source, root=str(root)))
    check(splits)
    out = tmp_path / "model"
    result = api.train(
        None, [f"data.source={source}", f"data.root={root}", *TINY, f"out={out}"], progress=False
    )
    assert result.classes == splits.classes
    assert result.metrics["test"]["images"] == len(splits.test)
    record = json.loads((out / "model.json").read_text())
    assert record["data"]["train_images"] + record["data"]["val_images"] == len(splits.train)
    assert record["num_classes"] == len(splits.classes)
    assert (out / "model.safetensors").is_file() and (out / "confusion.csv").is_file()


def test_cli_download_info_check_pack_and_train_from_shards(
    http_server, tmp_path, monkeypatch, capsys
):
    root = tmp_path / "cub"
    fab._prepare("cub200", fab.cub_release(), http_server, monkeypatch)
    assert cli.main(["data", "download", "cub200", str(root), "--mirror", http_server.url]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(root.absolute())
    assert dl.is_ready(root)
    splits = build_source(DataConfig(source="cub200", root=str(root)))

    assert cli.main(["data", "info", "cub200", str(root), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == len(splits.classes)
    assert info["splits"]["train"]["images"] == len(splits.train)
    assert info["splits"]["test"]["images"] == len(splits.test)
    assert "bbox" in info["annotations"]

    assert cli.main(["data", "check", str(root)]) == 0
    capsys.readouterr()

    shards = tmp_path / "shards"
    argv = ["data", "pack", "cub200", str(shards), "--shard-size", "2", f"data.root={root}"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["data", "info", "shards", str(shards)]) == 0
    text = capsys.readouterr().out
    assert f"train: {len(splits.train)} images" in text
    assert f"test: {len(splits.test)} images" in text

    out = tmp_path / "model"
    argv = ["train", "--no-progress", "data.source=shards", f"data.root={shards}", *TINY]
    # 3 training samples: a batch of 4 would make an epoch of no steps, which is refused.
    assert cli.main([*argv, f"out={tmp_path / 'refused'}"]) == 2
    assert "less than one whole batch" in capsys.readouterr().err
    assert cli.main([*argv, "data.batch_size=2", f"out={out}"]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["images"] == len(splits.test)
    assert json.loads((out / "model.json").read_text())["classes"] == splits.classes
    # The saved model evaluates on the shards and on the folder with the same result.
    on_shards = api.evaluate(out, [], progress=False)
    on_folder = api.evaluate(out, ["data.source=cub200", f"data.root={root}"], progress=False)
    assert on_shards == on_folder
    assert on_shards["top1"] == metrics["top1"]


def test_cli_names_what_to_fetch_for_a_manual_dataset(tmp_path, capsys):
    assert cli.main(["data", "download", "cars", str(tmp_path / "cars")]) == 2
    err = capsys.readouterr().err
    assert "cars_train.tgz" in err and str(tmp_path / "cars") in err
    assert not (tmp_path / "cars" / dl.READY_MARKER).exists()
