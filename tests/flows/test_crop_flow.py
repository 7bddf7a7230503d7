"""Object-crop fusion end to end through the CLI: train with crops from a JSON box file (some
images without a box), evaluate with attention crops and with the box file, predict with
`--boxes`, export the attention-crop graph to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flowkit import SCRATCH

from lookcloser import api, cli
from lookcloser.data.synthetic import synthetic_source

FAST = [*SCRATCH, "optim.lr=0.01"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("synthetic-crops")
    return [
        "data.source=synthetic",
        f"data.root={root}",
        "data.synthetic.classes=3",
        "data.synthetic.per_class=12",
        "data.synthetic.test_per_class=4",
        "data.synthetic.size=48",
    ]


@pytest.fixture(scope="module")
def box_file(synthetic) -> Path:
    """A box for every image but the first of each split, relative to the file's folder (the
    data root), as a detector would write it."""
    cfg = api.as_config(None, synthetic)
    splits = synthetic_source(cfg.data)
    root = Path(cfg.data.root)
    boxes = {}
    for samples in (splits.train, splits.test):
        for i, s in enumerate(sorted(samples, key=lambda s: s.path)):
            if i:
                boxes[str(Path(s.path).relative_to(root))] = [8 + i % 5, 6, 30, 28.5]
    path = root / "boxes.json"
    path.write_text(json.dumps(boxes), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def crop_model(synthetic, box_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("crop-run") / "model"
    argv = [*synthetic, *FAST, "model.crop_fusion=concat", f"data.boxes={box_file}", f"out={out}"]
    assert cli.main(["train", *argv]) == 0
    return out


def test_trained_model_records_crop_fusion_and_evaluates_both_ways(crop_model, box_file):
    record = json.loads((crop_model / "model.json").read_text())
    assert record["config"]["model"]["crop_fusion"] == "concat"
    assert record["config"]["data"]["boxes"] == str(box_file)
    test = json.loads((crop_model / "metrics.json").read_text())["test"]
    assert test["images"] == 12
    # metrics.json used attention crops (data.test_boxes=attention); eval gives the same, and
    # the box file's crops give another evaluation of the same images.
    attention = api.evaluate(crop_model, progress=False)
    assert attention["top1"] == pytest.approx(test["top1"])
    from_file = api.outputs_on_test(crop_model, [f"data.test_boxes={box_file}"], progress=False)[1]
    plain = api.outputs_on_test(crop_model, progress=False)[1]
    assert from_file.logits.shape == plain.logits.shape == (12, 3)
    assert (from_file.logits - plain.logits).abs().max() > 1e-6


def test_predict_takes_a_box_file(crop_model, box_file, synthetic, capsys):
    root = Path(api.as_config(None, synthetic).data.root)
    test_dir = root / "test"
    argv = ["predict", str(crop_model), str(test_dir), "--format", "json", "--top-k", "3"]
    assert cli.main([*argv, "--boxes", str(box_file)]) == 0
    captured = capsys.readouterr()
    with_boxes = json.loads(captured.out)
    # The first test image has no box: the whole image is its crop, and the CLI says so.
    assert "note: 1 image(s) have no box" in captured.err
    predictions = api.predict(crop_model, [test_dir], top_k=3, boxes=box_file)
    assert predictions.without_box == [with_boxes[0]["path"]]
    assert [[t["prob"] for t in p["top"]] for p in with_boxes] == [
        [round(x, 6) for x in p.probs] for p in predictions
    ]
    assert cli.main(argv) == 0  # no --boxes: attention crops
    attention = json.loads(capsys.readouterr().out)
    assert [p["top"] for p in attention] != [p["top"] for p in with_boxes]


def test_a_bad_box_file_is_a_clear_error(crop_model, synthetic, tmp_path, capsys):
    test_dir = Path(api.as_config(None, synthetic).data.root) / "test"
    bad = tmp_path / "bad.json"
    image = next(test_dir.rglob("*.png"))
    bad.write_text(json.dumps({str(image): [0, 0, 500, 10]}), encoding="utf-8")
    assert cli.main(["predict", str(crop_model), str(image), "--boxes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(image) in err and "outside the 48 x 48 image" in err


def test_attention_crop_graph_exports_to_onnx(crop_model, tmp_path):
    _, diff = api.export(crop_model, out=tmp_path / "m.onnx")
    assert diff < 1e-3
