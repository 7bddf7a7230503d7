"""An ArcFace head with metadata fusion end to end: train on the synthetic set with
class-linked metadata, evaluate (ECE included), predict with and without `--meta`, export to
ONNX with the metadata inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from flowkit import SCRATCH

from lookcloser import api, cli
from lookcloser.data.synthetic import synthetic_source

KEYS = ["latitude", "longitude", "day_of_year"]
FAST = SCRATCH


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("synthetic-meta")
    return [
        "data.source=synthetic",
        f"data.root={root}",
        "data.synthetic.classes=3",
        "data.synthetic.per_class=16",
        "data.synthetic.test_per_class=4",
        "data.synthetic.size=32",
        "data.synthetic.meta=true",
    ]


@pytest.fixture(scope="module")
def fused_model(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion-run") / "model"
    api.train(
        None,
        [
            *synthetic,
            *FAST,
            "model.head=arcface",
            "model.fusion=add",
            "model.meta_hidden=32",
            f"data.meta_keys=[{', '.join(KEYS)}]",
            "optim.lr=0.01",
            f"out={out}",
        ],
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def meta_file(synthetic, tmp_path_factory):
    """The test images' metadata as a `--meta` CSV (dates as ISO text, some values missing)."""
    cfg = api.as_config(None, synthetic)
    path = tmp_path_factory.mktemp("meta") / "meta.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "latitude", "longitude", "date"])
        for s in synthetic_source(cfg.data).test:
            writer.writerow(
                [s.path, *(s.meta.get(k, "") for k in ("latitude", "longitude", "date"))]
            )
    return path


def test_fused_arcface_model_records_its_inputs_and_metrics(fused_model):
    record = json.loads((fused_model / "model.json").read_text())
    assert record["meta_keys"] == KEYS
    assert record["config"]["model"]["head"] == "arcface"
    assert record["config"]["model"]["fusion"] == "add"
    metrics = json.loads((fused_model / "metrics.json").read_text())["test"]
    assert metrics["images"] == 12 and 0 <= metrics["ece"] <= 1
    assert api.evaluate(fused_model, progress=False)["ece"] == pytest.approx(metrics["ece"])


def test_predict_uses_the_metadata_file(fused_model, meta_file, capsys):
    predictor = api.load(fused_model)
    rows = {r["path"]: r for r in csv.DictReader(meta_file.open())}
    paths = sorted(rows)
    informed = predictor.predict(paths, top_k=3, meta=rows)
    plain = predictor.predict(paths, top_k=3)
    assert any(a.probs != b.probs for a, b in zip(plain, informed, strict=True))
    argv = ["predict", str(fused_model), *paths, "--format", "json", "--top-k", "3"]
    assert cli.main([*argv, "--meta", str(meta_file)]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert [[t["prob"] for t in p["top"]] for p in from_cli] == [
        [round(x, 6) for x in p.probs] for p in informed
    ]


def test_onnx_graph_takes_the_metadata(fused_model, meta_file, tmp_path):
    onnx_path, diff = api.export(fused_model, out=tmp_path / "m.onnx")
    assert diff < 1e-3
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "meta", "meta_mask"]
    predictor = api.load(fused_model)
    row = next(r for r in csv.DictReader(meta_file.open()) if all(r.values()))
    images = torch.stack([predictor.preprocess(row["path"])] * 2)
    meta, mask = predictor.meta_rows([row, {}])  # the date becomes day_of_year; {} all masked
    assert mask.tolist() == [[True] * 3, [False] * 3]
    feed = {"images": images.numpy(), "meta": meta.numpy(), "meta_mask": mask.numpy()}
    (logits,) = session.run(["logits"], feed)
    assert np.abs(logits - predictor.logits(images, meta, mask).numpy()).max() < 1e-3
