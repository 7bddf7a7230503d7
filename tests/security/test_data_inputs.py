"""Red-team cases for data inputs (issue 23, failure 8 and the data weak answers).

Split leakage: every split the project makes keeps copies of an image (same file under any
name, or the same bytes) on one side; a split the user gave that shares images between train
and test is warned about at train time and listed by `lookcloser data check`. Malformed CSVs,
shards, shard indexes and download mirrors get one line naming the file, line, key or URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from lookcloser import cli
from lookcloser.config import DataConfig
from lookcloser.data import download as dl
from lookcloser.data import shards as sh
from lookcloser.data.meta import read_meta_file
from lookcloser.data.prepare import prepare_data
from lookcloser.data.sources import DatasetSplits, Sample, build_source
from lookcloser.errors import BadImageError, ConfigError, DataError, unwrapped


def _png(path: Path, seed: int) -> Path:
    """A tiny PNG whose bytes differ for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (seed * 37 % 256, seed * 11 % 256, (seed // 7) * 29 % 256)
    Image.new("RGB", (16 + seed % 5, 16), colour).save(path)
    return path


def _keys(samples) -> set[bytes]:
    """What identifies an image: its bytes."""
    return {hashlib.sha256(Path(s.path).read_bytes()).digest() for s in samples}


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lookcloser: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Caught" not in err, err
    return lines[0]


# ---- failure 8: the project's own splits ----------------------------------------------------
def test_csv_with_repeated_rows_keeps_every_test_image_out_of_train(tmp_path, caplog):
    """path,label only, every row 3 times: the seeded split must not put one image on both
    sides (before: all distinct test files were also in train)."""
    rows = []
    for i in range(40):
        image = _png(tmp_path / "img" / f"{i:02d}.png", i)
        rows.append(f"img/{image.name},{'ab'[i % 2]}")
    (tmp_path / "all.csv").write_text("path,label\n" + "\n".join(rows * 3) + "\n")
    with caplog.at_level(logging.WARNING):
        splits = build_source(DataConfig(source="csv", root=str(tmp_path / "all.csv")))
    train, test = {s.path for s in splits.train}, {s.path for s in splits.test}
    assert not train & test
    assert len(splits.train) + len(splits.test) == 40  # one sample per image
    assert len(test) == 8
    assert "80 repeated row(s)" in caplog.text


def test_csv_copies_under_other_names_stay_on_one_side(tmp_path):
    """The same file spelt two ways, and the same bytes under another name, are one image."""
    rows = []
    for i in range(30):
        image = _png(tmp_path / "img" / f"{i:02d}.png", i)
        label = "ab"[i % 2]
        rows.append(f"img/{image.name},{label}")
        rows.append(f"./img/../img/{image.name},{label}")  # the same file
        copy = tmp_path / "copies" / f"copy{i:02d}.png"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(image, copy)
        rows.append(f"copies/{copy.name},{label}")  # the same bytes
    (tmp_path / "all.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    for seed in range(5):
        splits = build_source(
            DataConfig(source="csv", root=str(tmp_path / "all.csv"), split_seed=seed)
        )
        assert not _keys(splits.train) & _keys(splits.test)
        assert len(splits.train) + len(splits.test) == 60  # spellings collapsed, copies kept


def test_imagefolder_split_and_val_carve_keep_identical_bytes_on_one_side(tmp_path):
    """root/<class>/ split by seed, and the val carve from train: copies stay together."""
    for c, name in enumerate("abc"):
        for i in range(12):
            image = _png(tmp_path / "all" / name / f"{i:02d}.png", 100 * c + i)
            shutil.copyfile(image, image.with_name(f"{i:02d}-copy.png"))
    for seed in range(4):
        cfg = DataConfig(
            source="imagefolder",
            root=str(tmp_path / "all"),
            split_seed=seed,
            val_fraction=0.25,
            verify_images=False,
        )
        data = prepare_data(cfg)
        assert data.val_split == "carved" and data.val
        train, val, test = _keys(data.train), _keys(data.val), _keys(data.test)
        assert not train & test and not train & val and not val & test
        assert len(data.train) + len(data.val) + len(data.test) == 72


def test_unlabelled_copy_of_a_test_image_is_refused(tmp_path):
    for c, name in enumerate("ab"):
        for i in range(3):
            _png(tmp_path / "d" / "train" / name / f"{i}.png", 10 * c + i)
        _png(tmp_path / "d" / "test" / name / "t.png", 50 + c)
    shutil.copyfile(tmp_path / "d" / "test" / "a" / "t.png", _png(tmp_path / "u" / "x.png", 99))
    cfg = DataConfig(
        source="imagefolder",
        root=str(tmp_path / "d"),
        unlabelled=str(tmp_path / "u"),
        verify_images=False,
        val_fraction=0,
    )
    with pytest.raises(DataError, match=r"unlabelled: 1 image\(s\) are also in the val or test"):
        prepare_data(cfg)


# ---- failure 8: a split the user gave ---------------------------------------------------------
def _imagefolder_with_shared_bytes(root: Path) -> Path:
    for c, name in enumerate("ab"):
        for i in range(4):
            _png(root / "train" / name / f"{i}.png", 10 * c + i)
        _png(root / "test" / name / "t0.png", 60 + c)
    shutil.copyfile(root / "train" / "a" / "2.png", root / "test" / "a" / "leaked.png")
    return root


def test_given_imagefolder_split_sharing_bytes_is_warned_at_train_time(tmp_path, caplog):
    root = _imagefolder_with_shared_bytes(tmp_path / "d")
    cfg = DataConfig(source="imagefolder", root=str(root), val_fraction=0, verify_images=False)
    with caplog.at_level(logging.WARNING):
        data = prepare_data(cfg)
    assert len(data.test) == 3  # a warning, not a refusal: the user gave this split
    assert "train and test share 1 image(s)" in caplog.text
    assert "leaked.png" in caplog.text and "2.png" in caplog.text


def test_data_check_lists_files_a_given_split_shares(tmp_path, capsys):
    root = _imagefolder_with_shared_bytes(tmp_path / "d")
    code, out, _ = _run_cli(capsys, "data", "check", str(root))
    assert code == 1
    (line,) = [x for x in out.splitlines() if x.startswith("split overlap")]
    assert "train and test share 1 image(s)" in line and "leaked.png" in line
    code, out, _ = _run_cli(capsys, "data", "check", str(root), "--format", "json")
    (overlap,) = json.loads(out)["split_overlaps"]
    assert overlap["splits"] == ["train", "test"] and overlap["count"] == 1
    assert overlap["files"][0][1].endswith("leaked.png")
    # Without the leaked copy, the check passes.
    (root / "test" / "a" / "leaked.png").unlink()
    code, out, _ = _run_cli(capsys, "data", "check", str(root))
    assert code == 0 and "split overlap" not in out


def test_data_check_and_training_report_a_csv_split_that_shares_a_file(tmp_path, capsys, caplog):
    """Many files, first few named plus the count."""
    rows = []
    for i in range(12):
        _png(tmp_path / f"{i}.png", i)
        rows.append(f"{i}.png,{'ab'[i % 2]},train")
    rows += [f"{i}.png,{'ab'[i % 2]},test" for i in range(8)]  # 8 training images again
    (tmp_path / "d.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    code, out, _ = _run_cli(capsys, "data", "check", str(tmp_path / "d.csv"))
    assert code == 1
    assert "checked 12 image(s)" in out
    (line,) = [x for x in out.splitlines() if x.startswith("split overlap")]
    assert "share 8 image(s)" in line and "and 3 more" in line
    cfg = DataConfig(source="csv", root=str(tmp_path / "d.csv"), val_fraction=0)
    with caplog.at_level(logging.WARNING):
        prepare_data(cfg)
    assert "train and test share 8 image(s)" in caplog.text


@pytest.mark.parametrize("layout", ["one file", "train.csv and test.csv"])
def test_one_image_with_two_labels_names_file_labels_and_lines(tmp_path, capsys, layout):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    if layout == "one file":
        (tmp_path / "d.csv").write_text("path,label\na.png,owl\nb.png,hawk\n./a.png,hawk\n")
        root, first, second = tmp_path / "d.csv", f"{tmp_path / 'd.csv'}:2", "d.csv:4"
    else:
        (tmp_path / "train.csv").write_text("path,label\na.png,owl\nb.png,hawk\n")
        (tmp_path / "test.csv").write_text("path,label\na.png,hawk\n")
        root, first, second = tmp_path, "train.csv:2", "test.csv:2"
    with pytest.raises(DataError) as err:
        build_source(DataConfig(source="csv", root=str(root)))
    message = str(err.value)
    assert "a.png" in message and "'owl'" in message and "'hawk'" in message
    assert first in message and second in message
    code, _, err_text = _run_cli(capsys, "data", "info", "csv", str(root))
    assert code == 2 and "two labels" in _one_line_error(err_text)


# ---- weak answers: CSV --------------------------------------------------------------------
def test_csv_with_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(b"path,label\na.png,owl\nb.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"d\.csv:3: not UTF-8 text \(byte 0xe9"):
        build_source(DataConfig(source="csv", root=str(csv_file)))
    code, _, err = _run_cli(capsys, "data", "info", "csv", str(csv_file))
    assert code == 2 and "d.csv:3" in _one_line_error(err)
    meta = tmp_path / "meta.csv"
    meta.write_bytes(b"path,lat\na.png,1\nb.png,\xff\n")
    with pytest.raises(DataError, match=r"meta\.csv:3: not UTF-8"):
        read_meta_file(meta)


def test_csv_row_with_extra_fields_names_file_line_and_columns(tmp_path, capsys):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("path,label,lat\na.png,owl,1\nb.png,owl,2,3,4\n")
    with pytest.raises(DataError) as err:
        build_source(DataConfig(source="csv", root=str(csv_file)))
    assert "d.csv:3: 5 fields" in str(err.value) and "path, label, lat" in str(err.value)
    code, _, err_text = _run_cli(capsys, "data", "info", "csv", str(csv_file))
    assert code == 2 and "d.csv:3" in _one_line_error(err_text)


def test_text_in_a_declared_numeric_column_names_file_line_column_and_value(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("path,label,lat\na.png,owl,1.5\nb.png,hawk,north\nc.png,owl,\n")
    cfg = DataConfig(source="csv", root=str(csv_file), meta_keys=["lat"], verify_images=False)
    with pytest.raises(DataError) as err:
        prepare_data(cfg)
    message = str(err.value)
    assert "d.csv:3" in message and "'lat'" in message and "'north'" in message
    assert "no training sample" not in message


def test_text_meta_value_from_another_source_names_the_sample(tmp_path, monkeypatch):
    """Outside CSVs, the sample is named (not "in no training sample")."""
    from lookcloser.data import prepare

    samples = [Sample(f"/d/{i}.png", i % 2, {"lat": 1.0}) for i in range(4)]
    samples[2] = Sample("/d/odd.png", 0, {"lat": "n/a"})
    splits = DatasetSplits(["a", "b"], samples, samples[:1])
    monkeypatch.setattr(prepare, "build_source", lambda cfg: splits)
    cfg = DataConfig(source="csv", root="/d", meta_keys=["lat"], verify_images=False)
    with pytest.raises(DataError, match=r"/d/odd.png: meta 'lat': expected a number, got 'n/a'"):
        prepare_data(cfg)
    splits.train[2] = Sample("/d/odd.png", 0, {})
    with pytest.raises(ConfigError, match="in no training sample"):
        prepare_data(DataConfig(source="csv", root="/d", meta_keys=["alt"], verify_images=False))


# ---- weak answers: shards and dataset.json ---------------------------------------------------
@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """2 classes: 16 training and 4 test images packed as shards of 4 samples."""

    def make(split: str, n: int, offset: int) -> list[Sample]:
        return [
            Sample(str(_png(tmp_path / "img" / f"{split}{i}.png", offset + i)), i % 2)
            for i in range(n)
        ]

    splits = DatasetSplits(["a", "b"], make("train", 16, 0), make("test", 4, 100), "toy")
    out = tmp_path / "shards"
    sh.pack_shards(splits, out, shard_size=4)
    return out


def _rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with `change(name, data) -> data` applied to every member."""
    members = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            members.append((member.name, tar.extractfile(member).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _stream(shard_dir: Path, split: str = "test", **kwargs) -> list:
    return list(sh.ShardDataset.from_index(sh.open_shards(str(shard_dir)), split, **kwargs))


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("data", r"corrupt or truncated shard \(in sample test_000000002: "),
        # tarfile reads a cut header as the end of the archive: the count tells.
        ("header", r"holds 2 samples, but .*dataset.json records 4"),
        ("boundary", r"holds 2 samples, but .*dataset.json records 4"),
    ],
)
def test_truncated_shard_names_the_shard_and_the_sample(shard_dir, where, message):
    shard = shard_dir / "test-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("test_000000002.png")
    cut = {
        "data": member.offset_data + member.size // 2,
        "header": member.offset + 100,
        "boundary": member.offset,
    }[where]
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DataError, match=rf"{shard}: {message}"):
        _stream(shard_dir)


def test_shard_that_is_not_a_tar_names_the_shard(shard_dir):
    shard = shard_dir / "test-000000.tar"
    shard.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError, match=rf"{shard}: not a readable tar shard"):
        _stream(shard_dir)


@pytest.mark.parametrize("value", [b"x", b"7", b"-1", b"1.0"])
def test_bad_cls_value_names_shard_sample_and_value(shard_dir, value):
    shard = shard_dir / "test-000000.tar"
    _rewrite_shard(shard, lambda name, data: value if name == "test_000000002.cls" else data)
    with pytest.raises(DataError) as err:
        _stream(shard_dir)
    message = str(err.value)
    assert str(shard) in message and "test_000000002.cls" in message
    assert "0..1" in message and repr(value.decode()) in message


def test_bad_sample_record_names_shard_and_sample(shard_dir):
    shard = shard_dir / "test-000000.tar"
    _rewrite_shard(shard, lambda name, data: b"{oops" if name == "test_000000001.json" else data)
    with pytest.raises(
        DataError, match=r"test-000000.tar: sample test_000000001: .*not valid JSON"
    ):
        _stream(shard_dir)


def test_missing_shard_is_named_when_the_index_is_opened(shard_dir):
    (shard_dir / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"1 listed shard\(s\) missing: .*train-000002.tar"):
        sh.open_shards(str(shard_dir))


def test_corrupt_image_in_a_shard_is_named_and_skipped_with_on_bad_image_skip(shard_dir, caplog):
    shard = shard_dir / "test-000000.tar"
    _rewrite_shard(shard, lambda name, data: data[:60] if name == "test_000000003.png" else data)
    with pytest.raises(BadImageError) as err:
        _stream(shard_dir)
    assert str(shard) in str(err.value) and "test_000000003.png" in str(err.value)
    with caplog.at_level(logging.WARNING):
        kept = _stream(shard_dir, on_bad_image="skip")
    assert len(kept) == 3
    assert "skipping" in caplog.text and f"{shard} (test_000000003.png)" in caplog.text


def test_index_count_that_does_not_match_its_shard_counts_is_refused(shard_dir):
    """dataset.json says 2,800 samples while its shards hold 16: refused, both counts named
    (before: training cycled the same data and recorded 2,800)."""
    index = json.loads((shard_dir / "dataset.json").read_text())
    index["splits"]["train"]["count"] = 2800
    (shard_dir / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DataError) as err:
        sh.open_shards(str(shard_dir))
    message = str(err.value)
    assert "dataset.json" in message and "2800" in message and "16" in message


def test_shard_holding_fewer_samples_than_its_index_records_is_refused_while_training(shard_dir):
    """Both the count and the per-shard counts edited: the first pass over the shard finds
    the real number and stops training."""
    index = json.loads((shard_dir / "dataset.json").read_text())
    index["splits"]["train"]["count"] = 2800
    index["splits"]["train"]["shard_counts"] = [700, 700, 700, 700]
    (shard_dir / "dataset.json").write_text(json.dumps(index))
    dataset = sh.ShardDataset.from_index(
        sh.open_shards(str(shard_dir)), "train", batch_size=4, shuffle_buffer=1
    )
    with pytest.raises(DataError, match=r"train-00000\d.tar: holds 4 samples, but .*records 700"):
        list(dataset)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.pop("classes"), "'classes' must be a list"),
        (lambda i: i["splits"]["train"].pop("shards"), r"splits.train.shards: expected a list"),
        (lambda i: i["splits"]["train"].update(count="16"), r"splits.train.count: expected"),
        (lambda i: i["splits"]["test"].update(shard_counts=[4, 4]), "splits.test.shard_counts"),
    ],
)
def test_malformed_index_fields_are_named(shard_dir, edit, message):
    index = json.loads((shard_dir / "dataset.json").read_text())
    edit(index)
    (shard_dir / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=message):
        sh.open_shards(str(shard_dir))


def test_worker_errors_reach_the_user_as_the_original_line(shard_dir):
    """A DataLoader worker's error is re-raised by torch with its traceback as the message
    (or as a RuntimeError for BadImageError); `unwrapped` gives back the one line."""
    _rewrite_shard(
        shard_dir / "test-000000.tar",
        lambda name, data: b"9" if name == "test_000000001.cls" else data,
    )
    dataset = sh.ShardDataset.from_index(sh.open_shards(str(shard_dir)), "test")
    loader = torch.utils.data.DataLoader(dataset, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(DataError) as err:
        list(loader)
    assert "Traceback" in str(err.value)  # what torch does
    clean = unwrapped(err.value)
    assert isinstance(clean, DataError) and "\n" not in str(clean)
    assert str(clean).startswith(f"{shard_dir / 'test-000000.tar'}: sample test_000000001")


def test_training_on_a_shard_with_a_bad_label_prints_one_line(shard_dir, tmp_path, capsys):
    """End to end with a DataLoader worker process: the CLI prints the shard and sample."""
    _rewrite_shard(
        shard_dir / "train-000001.tar",
        lambda name, data: b"x" if name.endswith(".cls") else data,
    )
    code, _, err = _run_cli(
        capsys,
        "train",
        "data.source=shards",
        f"data.root={shard_dir}",
        "data.num_workers=1",
        "data.image_size=32",
        "data.batch_size=4",
        "data.crop_pct=1.0",
        "model.backbone=test_efficientnet",
        "model.pretrained=false",
        "trainer.epochs=1",
        "trainer.progress=none",
        f"out={tmp_path / 'run'}",
    )
    line = _one_line_error(err)
    assert code == 2 and "train-000001.tar: sample train_" in line and ".cls must be" in line


# ---- weak answers: download -------------------------------------------------------------------
class _Mirror(BaseHTTPRequestHandler):
    """A misbehaving mirror: `endless` (no Content-Length, bytes until the client goes),
    `slow` (1 byte every 20 ms of an announced 10,000), `stall` (headers, then nothing) or
    `long` (announces more than the file has)."""

    protocol_version = "HTTP/1.0"
    sent: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        mode = self.path.strip("/").split("/")[0]
        self.send_response(200)
        if mode == "slow":
            self.send_header("Content-Length", "10000")
        if mode == "long":
            self.send_header("Content-Length", str(10**9))
        self.end_headers()
        sent = 0
        try:
            while sent < 50 * 2**20:  # a bound, should the client never stop
                if mode == "endless":
                    self.wfile.write(b"z" * 65536)
                    sent += 65536
                elif mode == "slow" and sent < 10000:
                    self.wfile.write(b"s")
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.02)
                elif mode == "stall" and sent < 60:  # headers, then 3 s of nothing
                    time.sleep(0.05)
                    sent += 1
                else:
                    break
                _Mirror.sent[mode] = sent
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endless_mirror_is_stopped_at_the_expected_size(mirror, tmp_path):
    """Before: 440 MB written for a 344,862,509-byte file."""
    url = f"{mirror}/endless/102flowers.tgz"
    with pytest.raises(DataError) as err:
        dl.download_file(url, tmp_path / "f.tgz", size=300_000)
    assert url in str(err.value) and "more than the expected 300000 bytes" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing kept
    time.sleep(0.2)
    assert _Mirror.sent["endless"] < 20 * 2**20  # the client stopped reading


def test_mirror_announcing_more_than_the_file_is_refused_before_reading(mirror, tmp_path):
    url = f"{mirror}/long/f.bin"
    with pytest.raises(DataError, match=r"announces 1000000000 bytes .* the file has 5000"):
        dl.download_file(url, tmp_path / "f.bin", size=5000)


def test_slow_mirror_stops_at_the_deadline_and_keeps_what_arrived(mirror, tmp_path):
    url = f"{mirror}/slow/f.bin"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        dl.download_file(url, tmp_path / "f.bin", size=10000, deadline_s=0.6, read_timeout_s=5)
    assert time.monotonic() - start < 3
    message = str(err.value)
    assert url in message and "deadline of 0.6 s" in message and "of 10000 bytes" in message
    kept = tmp_path / "f.bin.part"
    assert 0 < kept.stat().st_size < 10000 and str(kept) in message


def test_stalled_mirror_hits_the_read_timeout(mirror, tmp_path):
    url = f"{mirror}/stall/f.bin"
    start = time.monotonic()
    with pytest.raises(DataError, match="download interrupted"):
        dl.download_file(url, tmp_path / "f.bin", size=100, retries=0, read_timeout_s=0.3)
    assert time.monotonic() - start < 3


def test_default_deadline_grows_with_the_size():
    assert dl.default_deadline(0) == 300
    flowers = dl.default_deadline(344_862_509)
    assert 1500 < flowers < 1700  # about 27 minutes at the 256 KiB/s floor
    assert dl.default_deadline(None) > 0


def test_data_download_deadline_option_and_progress_lines(mirror, tmp_path, capsys, monkeypatch):
    """`data download --deadline` ends a slow mirror with one line, after progress lines."""
    file = dl.ArchiveFile("https://example.org/slow/toy.tar", "toy.tar", "0" * 64, size=10000)
    spec = dl.DownloadSpec("toy", "Toy set", "https://example.org", "none", (file,), ("x",))
    monkeypatch.setitem(dl.DOWNLOADS, "toy", spec)
    lines = dl.ProgressLines
    monkeypatch.setattr(dl, "ProgressLines", lambda: lines(every_s=0.2))
    code, _, err = _run_cli(
        capsys, "data", "download", "toy", str(tmp_path / "toy"), "--mirror", mirror,
        "--deadline", "1",
    )  # fmt: skip
    line = _one_line_error(err)
    assert code == 2 and "slow/toy.tar" in line and "deadline of" in line
    progress = [x for x in err.splitlines() if x.startswith("toy.tar: ")]
    assert len(progress) >= 2 and "MiB/s" in progress[-1]


def test_download_dataset_has_an_overall_deadline(mirror, tmp_path, monkeypatch):
    file = dl.ArchiveFile("https://example.org/slow/toy.tar", "toy.tar", "0" * 64, size=10000)
    spec = dl.DownloadSpec("toy", "Toy set", "https://example.org", "none", (file,), ("x",))
    monkeypatch.setitem(dl.DOWNLOADS, "toy", dataclasses.replace(spec))
    with pytest.raises(DataError, match="deadline"):
        dl.download_dataset("toy", tmp_path / "toy", mirror=mirror, deadline_s=0.5)
