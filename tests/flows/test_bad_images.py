"""Bad input: `data check` reports it, `train` refuses it clearly, `on_bad_image=skip` lists it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flowkit import TINY, run_cli
from PIL import Image

BAD = {"corrupt.jpg", "truncated.jpg", "zero.jpg", "text.jpg"}


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory, synthetic_root):
    """The tiny synthetic set plus corrupt, truncated, zero-byte, text, CMYK and 16-bit files."""
    import shutil

    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(synthetic_root / "train", root / "train")
    shutil.copytree(synthetic_root / "test", root / "test")
    target = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0]
    rng = np.random.default_rng(0)
    good = _jpeg(rng)
    scan = good.find(b"\xff\xda")
    (target / "corrupt.jpg").write_bytes(good[:scan] + rng.bytes(2000))
    (target / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (target / "zero.jpg").write_bytes(b"")
    (target / "text.jpg").write_text("not an image\n" * 20)
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(target / "cmyk.jpg")
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(target / "gray16.png")
    return root


def test_data_check_reports_each_problem(messy_root):
    result = run_cli("data", "check", str(messy_root), "--format", "json", check=False)
    assert result.returncode == 1  # bad files found
    report = json.loads(result.stdout)
    assert {p["path"].rsplit("/", 1)[-1] for p in report["bad"]} == BAD
    problems = {p["path"].rsplit("/", 1)[-1]: p["problem"] for p in report["bad"]}
    assert problems["zero.jpg"] == "empty file"
    assert "not an image" in problems["text.jpg"]
    assert {m["mode"] for m in report["odd_modes"]} >= {"CMYK", "I;16"}
    text = run_cli("data", "check", str(messy_root), check=False).stdout
    assert "4 unreadable" in text and "mode CMYK" in text


def test_train_stops_before_training_with_the_bad_files_named(messy_root, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "data.source=imagefolder",
        f"data.root={messy_root}",
        *TINY,
        f"out={out}",
        check=False,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lookcloser: error: 4 unreadable image(s)")
    assert "zero.jpg (empty file)" in line or "and 1 more" in line
    assert "data.on_bad_image=skip" in line
    assert not (out / "model.json").exists() and not (out / "checkpoints").exists()


def test_train_with_skip_succeeds_and_lists_skipped(messy_root, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--no-progress", "data.source=imagefolder", f"data.root={messy_root}"]
    result = run_cli(*args, *TINY, "data.on_bad_image=skip", f"out={out}")
    assert "skipped 4 bad image(s)" in result.stderr
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert {line.split(":")[0].rsplit("/", 1)[-1] for line in skipped} == BAD
    record = json.loads((out / "model.json").read_text())
    assert record["data"]["skipped"] == 4
    # CMYK and 16-bit images are used (for training or validation).
    assert record["data"]["train_images"] + record["data"]["val_images"] == 48 + 2


def test_predict_skip_lists_every_bad_file_and_predicts_the_rest(messy_root, trained_model):
    folder = messy_root / "train" / sorted(p.name for p in (messy_root / "train").iterdir())[0]
    args = ["predict", str(trained_model), str(folder), "--format", "json"]
    result = run_cli(*args, "--on-bad-image", "skip")
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped: ")]
    assert {line.split(":")[1].strip().rsplit("/", 1)[-1] for line in skipped} == BAD
    assert all(line.count(": ") >= 2 for line in skipped)  # each with its reason
    predicted = {p["path"].rsplit("/", 1)[-1] for p in json.loads(result.stdout)}
    assert len(predicted) == 16 + 2 and not predicted & BAD  # 16 good, CMYK, 16-bit


def test_predict_error_names_every_bad_file(messy_root, trained_model):
    folder = messy_root / "train" / sorted(p.name for p in (messy_root / "train").iterdir())[0]
    result = run_cli("predict", str(trained_model), str(folder), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lookcloser: error: 4 unreadable image(s) of 22")
    for name in BAD:
        assert f"{name} (" in line
    assert result.stdout == ""
