"""The CLI end to end: train -> eval -> predict -> explain -> export, each in a fresh process."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import onnxruntime as ort
from flowkit import TINY, run_cli
from PIL import Image


def test_train_writes_a_complete_model_directory(trained_model):
    for name in [
        "model.safetensors",
        "model.json",
        "metrics.json",
        "confusion.png",
        "confusion.csv",
        "config.yaml",
    ]:
        assert (trained_model / name).is_file(), name
    assert (trained_model / "checkpoints" / "last.ckpt").is_file()
    assert (trained_model / "logs" / "csv" / "metrics.csv").is_file()
    assert list((trained_model / "logs" / "tensorboard").glob("events.*"))
    record = json.loads((trained_model / "model.json").read_text())
    assert record["classes"] == sorted(record["classes"]) and len(record["classes"]) == 3
    assert record["preprocessing"]["image_size"] == 64
    assert record["config"]["data"]["image_size"] == 64
    assert {"torch", "timm", "lightning", "lookcloser"} <= set(record["versions"])
    metrics = json.loads((trained_model / "metrics.json").read_text())
    assert metrics["test"]["images"] == 12 and 0.0 <= metrics["test"]["top1"] <= 1.0
    # data.val_fraction=0.1 of 16 training images per class: 2 per class validate.
    assert metrics["val"]["images"] == 6 and 0.0 <= metrics["val"]["top1"] <= 1.0
    assert record["data"]["train_images"] == 42 and record["data"]["val_split"] == "carved"
    assert record["metrics"]["test"]["top1"] == metrics["test"]["top1"]
    assert record["meta_keys"] == []


def test_eval_json_matches_training_metrics(trained_model):
    result = run_cli("eval", str(trained_model), "--format", "json")
    metrics = json.loads(result.stdout)
    saved = json.loads((trained_model / "metrics.json").read_text())["test"]
    for key in ["top1", "top3", "mean_per_class_accuracy", "ece"]:
        assert abs(metrics[key] - saved[key]) < 1e-6, key


def test_predict_formats(trained_model, synthetic_root):
    folder = (
        synthetic_root / "test" / sorted(p.name for p in (synthetic_root / "test").iterdir())[0]
    )
    out = json.loads(
        run_cli(
            "predict", str(trained_model), str(folder), "--top-k", "2", "--format", "json"
        ).stdout
    )
    assert len(out) == 4 and all(len(p["top"]) == 2 for p in out)
    assert all(p["top"][0]["prob"] >= p["top"][1]["prob"] for p in out)
    rows = list(
        csv.DictReader(
            io.StringIO(
                run_cli(
                    "predict", str(trained_model), str(folder), "--top-k", "1", "--format", "csv"
                ).stdout
            )
        )
    )
    assert [r["path"] for r in rows] == [p["path"] for p in out]
    assert [r["class"] for r in rows] == [p["top"][0]["class"] for p in out]


def test_explain_writes_heatmap_png(trained_model, synthetic_root, tmp_path):
    image = next((synthetic_root / "test").rglob("*.png"))
    out = tmp_path / "heat.png"
    run_cli("explain", str(trained_model), str(image), "--out", str(out))
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert png.shape[1] > 2 * png.shape[0] * 0.9  # input, overlay and colour bar side by side
    # Without --out the picture goes into the model directory, not the current folder.
    default = run_cli("explain", str(trained_model), str(image), cwd=tmp_path)
    written = trained_model / "explanations" / f"{image.stem}.png"
    assert default.stdout.strip() == str(written) and written.is_file()
    assert not list(tmp_path.glob("*.png*")) or list(tmp_path.glob("*.png")) == [out]


def test_export_onnx_matches_pytorch(trained_model, tmp_path):
    out = tmp_path / "m.onnx"
    result = run_cli("export", str(trained_model), "--format", "onnx", "--out", str(out))
    diff = float(result.stdout.strip().rsplit(" ", 1)[-1])
    assert diff < 1e-3
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": np.random.rand(3, 3, 64, 64).astype(np.float32)})
    assert logits.shape == (3, 3)


def test_errors_are_one_line_with_nonzero_exit(trained_model, tmp_path):
    bad_key = run_cli("train", "trainer.epoch=3", check=False)
    assert bad_key.returncode != 0
    assert bad_key.stderr.strip().splitlines() == [
        "lookcloser: error: override: unknown key 'trainer.epoch'; did you mean 'trainer.epochs'?"
    ]
    bad_type = run_cli("train", "trainer.epochs=many", check=False)
    assert bad_type.returncode != 0 and "trainer.epochs: expected int" in bad_type.stderr
    not_model = run_cli("eval", str(tmp_path), check=False)
    assert not_model.returncode != 0 and "no model.json" in not_model.stderr
    again = run_cli("train", *TINY, f"out={trained_model}", check=False)
    assert again.returncode != 0 and "already holds a trained model" in again.stderr


def test_help_on_every_command():
    for command in [
        [],
        ["demo"],
        ["train"],
        ["eval"],
        ["predict"],
        ["explain"],
        ["export"],
        ["serve"],
        ["data"],
        ["data", "synth"],
        ["data", "check"],
    ]:
        result = run_cli(*command, "--help")
        assert "usage: lookcloser" in result.stdout


def test_data_synth_writes_imagefolder(tmp_path):
    run_cli(
        "data",
        "synth",
        str(tmp_path / "s"),
        "--classes",
        "2",
        "--per-class",
        "3",
        "--test-per-class",
        "1",
        "--size",
        "48",
    )
    assert len(list((tmp_path / "s" / "train").rglob("*.png"))) == 6
    assert len(list((tmp_path / "s" / "test").rglob("*.png"))) == 2
    assert Image.open(next((tmp_path / "s" / "train").rglob("*.png"))).size == (48, 48)
