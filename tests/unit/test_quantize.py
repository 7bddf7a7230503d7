"""int8 ONNX export: calibrated static quantization, checked against fp32, recorded beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lookcloser import api
from lookcloser.cli import main
from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.data.sources import build_source
from lookcloser.errors import ConfigError, DataError
from lookcloser.export.quantize import QuantizeSettings
from lookcloser.methods import build_method
from lookcloser.methods.base import register_method
from lookcloser.methods.baseline import Baseline
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """EfficientNet-Lite0 with its ImageNet weights and a random 4-class head, saved as a
    model directory whose recorded data is a small synthetic ImageFolder set."""
    from lookcloser.data.synthetic import generate

    root = generate(
        tmp_path_factory.mktemp("synthetic"), classes=4, per_class=12, test_per_class=4, size=SIZE
    )
    cfg = Config.load(
        None,
        [
            "data.source=imagefolder",
            f"data.root={root}",
            f"data.image_size={SIZE}",
            "data.crop_pct=1.0",
            "model.backbone=tf_efficientnet_lite0",
            "model.pretrained=true",
        ],
    )
    classes = build_source(cfg.data).classes
    torch.manual_seed(0)
    method = build_method(cfg, len(classes)).eval()
    out = tmp_path_factory.mktemp("run")
    save_run_model(out, method, TrainingData(classes), cfg, {}, "bicubic")
    return out


def test_int8_agrees_with_fp32_and_records_it(model_dir, tmp_path):
    """The int8 file loads in a plain InferenceSession, has the fp32 graph's inputs and
    outputs, predicts the fp32 top-1 on most test images, and its sidecar records the
    agreement measured at export on images it was not calibrated on."""
    result = api.export_int8(
        model_dir, tmp_path / "m.int8.onnx", calibration_images=16, check_images=24
    )
    assert result.path.is_file() and result.sidecar == tmp_path / "m.int8.json"
    assert result.calibrated == 16 and result.checked == 24
    assert "held-out" in result.check_source
    assert result.bytes_int8 < result.bytes_fp32 / 2  # int8 weights

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    # Quantized (QDQ: int8 weights behind DequantizeLinear), not an fp32 graph renamed.
    graph = onnx.load(str(result.path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 40  # lite0's convolutions less the first one

    predictor = Predictor.load(model_dir)
    test = build_source(Config.from_dict(predictor.info["config"]).data).test
    images = torch.stack([predictor.preprocess(s.path) for s in test])
    (int8_logits,) = session.run(["logits"], {"images": images.numpy()})
    fp32_top1 = predictor.logits(images).argmax(1).numpy()
    assert (int8_logits.argmax(1) == fp32_top1).mean() >= 0.8
    # The batch axis stays dynamic (the server's ONNX backend batches requests).
    for batch in (1, 5):
        (logits,) = session.run(["logits"], {"images": images[:batch].numpy()})
        assert logits.shape == (batch, len(predictor.classes))

    sidecar = json.loads(result.sidecar.read_text())
    check = sidecar["check_against_fp32"]
    assert check["top1_agreement"] == result.agreement >= 0.8
    assert check["images"] == 24
    assert sidecar["precision"] == "int8" and sidecar["file"] == "m.int8.onnx"
    assert sidecar["classes"] == predictor.classes
    assert sidecar["quantization"]["calibrated_on"] == 16
    assert sidecar["quantization"]["quant_format"] == "qdq"
    assert sidecar["preprocessing"]["image_size"] == SIZE


def test_cli_export_int8_prints_agreement(model_dir, tmp_path, capsys):
    """`export --quantize int8` with --calibration DIR and QOperator: too few images for a
    held-out set, so the check runs on the calibration images and says so."""
    calibration = tmp_path / "calib"
    calibration.mkdir()
    root = Config.from_dict(Predictor.load(model_dir).info["config"]).data.root
    for i, src in enumerate(sorted(Path(root, "test").rglob("*.png"))[:6]):
        (calibration / f"{i}.png").write_bytes(src.read_bytes())
    out = tmp_path / "cli.int8.onnx"
    code = main(
        [
            "export",
            str(model_dir),
            "--quantize",
            "int8",
            "--out",
            str(out),
            "--calibration",
            str(calibration),
            "--calibration-images",
            "8",
            "--quant-format",
            "qoperator",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "top-1 agreement with fp32" in text and "calibration images" in text
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["quantization"]["quant_format"] == "qoperator"
    assert sidecar["quantization"]["calibrated_on"] == 6
    assert "calibration images" in sidecar["check_against_fp32"]["which"]
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_bad_quantize_values_are_refused(model_dir, tmp_path, capsys):
    """A --quantize or --quant-format value other than the supported ones is a usage error
    naming the value; nothing is written."""
    for flag, value in (("--quantize", "int4"), ("--quant-format", "fp8")):
        args = ["export", str(model_dir), "--out", str(tmp_path / "x.onnx"), flag, value]
        if flag != "--quantize":
            args += ["--quantize", "int8"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert value in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="fp8"):
        QuantizeSettings(quant_format="fp8").validate()
    with pytest.raises(ConfigError, match="calibration_images"):
        api.export_int8(model_dir, tmp_path / "y.onnx", calibration_images=0)


def test_empty_calibration_folder_is_named(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        api.export_int8(model_dir, tmp_path / "z.onnx", calibration=empty)
    assert not (tmp_path / "z.onnx").exists()


@register_method
class _MetaBaseline(Baseline):
    """The baseline's logits plus a linear term of (meta * mask, mask)."""

    name = "test-quantize-meta"
    accepts_meta = True

    def __init__(self, backbone, num_classes, options=None, **kwargs):
        super().__init__(backbone, num_classes, options, **kwargs)
        self.meta_head = nn.Linear(2 * len(self.meta_keys), num_classes)

    def forward_head(self, features, meta=None, meta_mask=None):
        mask = meta_mask.float()
        return super().forward_head(features) + self.meta_head(torch.cat([meta * mask, mask], 1))


def test_metadata_model_quantizes_with_its_inputs(tmp_path):
    """A model taking metadata keeps `meta` and `meta_mask` (bool) as int8 graph inputs."""
    from lookcloser.data.synthetic import generate
    from lookcloser.export.quantize import quantize_int8

    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            "method.name=test-quantize-meta",
            "data.meta_keys=[lat, lon]",
        ],
    )
    torch.manual_seed(0)
    predictor = Predictor(build_method(cfg, 3), ["a", "b", "c"], image_size=32)
    images = generate(tmp_path / "images", classes=3, per_class=2, test_per_class=0, size=32)
    result = quantize_int8(
        predictor,
        tmp_path / "meta.int8.onnx",
        images,
        QuantizeSettings(calibration_images=4, check_images=2, batch_size=2),
    )
    assert result.graph == "torch.export" and result.checked == 2
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.type for i in session.get_inputs()}
    assert inputs == {
        "images": "tensor(float)",
        "meta": "tensor(float)",
        "meta_mask": "tensor(bool)",
    }
    feed = {
        "images": np.zeros((3, 3, 32, 32), np.float32),
        "meta": np.ones((3, 2), np.float32),
        "meta_mask": np.array([[True, False]] * 3),
    }
    assert session.run(["logits"], feed)[0].shape == (3, 3)
    assert json.loads(result.sidecar.read_text())["inputs"] == ["images", "meta", "meta_mask"]
