"""ONNX export checked with ONNX Runtime, and Grad-CAM maps."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from meta_method import META_METHOD
from PIL import Image

from lookcloser.config import Config
from lookcloser.errors import ConfigError
from lookcloser.explain.cam import grad_cam, normalize_maps
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import build_method
from lookcloser.predictor import Predictor

SIZE = 64


def _method(backbone: str = "test_efficientnet", classes: int = 3, *overrides: str):
    torch.manual_seed(0)
    cfg = Config.load(None, [f"model.backbone={backbone}", "model.pretrained=false", *overrides])
    return build_method(cfg, classes)


@pytest.fixture(scope="module")
def meta_predictor():
    """A tiny untrained predictor taking two metadata values."""
    method = _method(
        "test_efficientnet", 3, f"method.name={META_METHOD}", "data.meta_keys=[lat, lon]"
    )
    with torch.no_grad():
        method.meta_head.weight.normal_()  # make the metadata matter
    return Predictor(method, ["a", "b", "c"], image_size=SIZE)


@pytest.fixture(scope="module")
def predictor():
    """A tiny untrained Baseline predictor."""
    return Predictor(_method(), ["a", "b", "c"], image_size=SIZE)


def test_onnx_export_dynamic_batch(predictor, tmp_path):
    """The exported graph takes any batch size and matches PyTorch's logits."""
    path = export_onnx(predictor, tmp_path / "out" / "model.onnx")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3):
        images = torch.rand(batch, 3, SIZE, SIZE, generator=gen)
        (logits,) = session.run(["logits"], {"images": images.numpy().astype(np.float32)})
        assert logits.shape == (batch, 3)
        expected = predictor.logits(images).numpy()
        assert np.abs(logits - expected).max() < 1e-3
        assert max_abs_difference(predictor, path, images) < 1e-3
    assert max_abs_difference(predictor, path) < 1e-3
    assert not predictor.method.training


def test_grad_cam_maps(predictor):
    """Grad-CAM gives B x H x W maps in [0, 1] that vary over a non-trivial image."""
    method = predictor.method
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen)
    images[:, :, : SIZE // 2] *= 0.2  # a darker top half
    maps = grad_cam(method, images)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:
        assert m.max() - m.min() > 0.1
    target = torch.tensor([2, 2])
    assert torch.equal(grad_cam(method, images, target), method.attention(images, target))
    assert not images.requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_grad_cam_keeps_training_flag(training):
    """Grad-CAM runs in eval mode and restores the method's training flag."""
    method = _method().train(training)
    grad_cam(method, torch.rand(1, 3, SIZE, SIZE))
    assert method.training is training
    assert all(m.training is training for m in method.modules())


def test_grad_cam_on_vit_tokens():
    """Grad-CAM works on a ViT's token features via the backbone's grid."""
    method = _method("test_vit").eval()
    size = method.backbone.data_config["input_size"][1]
    maps = grad_cam(
        method, torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    )
    assert maps.shape == (1, size, size)
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_normalize_maps_flat_becomes_zero():
    """Each map is scaled to [0, 1] on its own; a flat map becomes zeros."""
    maps = torch.stack([torch.full((2, 2), 3.0), torch.tensor([[1.0, 2.0], [3.0, 5.0]])])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(2, 2))
    assert torch.allclose(out[1], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


def test_onnx_export_of_a_meta_model_takes_meta_and_mask(meta_predictor, tmp_path):
    """Inputs images, meta, meta_mask (dynamic batch); parity with PyTorch for any mask."""
    path = export_onnx(meta_predictor, tmp_path / "meta.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "meta", "meta_mask"]
    assert max_abs_difference(meta_predictor, path) < 1e-3
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, SIZE, SIZE, generator=gen)
    meta = torch.randn(3, 2, generator=gen)
    for mask in (torch.ones(3, 2, dtype=torch.bool), torch.tensor([[1, 0], [0, 1], [0, 0]]) > 0):
        assert max_abs_difference(meta_predictor, path, (images, meta, mask)) < 1e-3
    feed = {"images": images.numpy(), "meta": meta.numpy(), "meta_mask": np.zeros((3, 2), bool)}
    (masked,) = session.run(["logits"], feed)
    # All masked is what the Predictor gives when no metadata is passed.
    assert np.abs(masked - meta_predictor.logits(images).numpy()).max() < 1e-3
    feed["meta_mask"] = np.ones((3, 2), bool)
    (used,) = session.run(["logits"], feed)
    assert np.abs(used - masked).max() > 1e-2


def test_predictor_and_grad_cam_carry_meta(meta_predictor):
    """Metadata changes the logits and the explanation's probability; missing = masked."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    meta, mask = meta_predictor.meta_rows([{"lat": 40.0, "lon": -3.0}, {"lon": 7.0}])
    assert mask.tolist() == [[True, True], [False, True]]
    with_meta = meta_predictor.logits(images, meta, mask)
    assert not torch.allclose(with_meta, meta_predictor.logits(images))
    nan_meta = torch.tensor([[40.0, -3.0], [float("nan"), 7.0]])
    assert torch.allclose(meta_predictor.logits(images, nan_meta), with_meta)  # NaN = missing
    maps = grad_cam(meta_predictor.method, images, None, meta, mask)
    assert maps.shape == (2, SIZE, SIZE)
    picture = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    plain = meta_predictor.explain(picture, target=0)
    informed = meta_predictor.explain(picture, target=0, meta={"lat": 40.0, "lon": -3.0})
    assert plain.prob != pytest.approx(informed.prob)
    with pytest.raises(ConfigError, match="expected 2 x 2 values"):
        meta_predictor.logits(images, torch.zeros(2, 3))


def test_meta_keys_need_a_method_that_takes_them():
    with pytest.raises(ConfigError, match="does not use metadata"):
        _method("test_efficientnet", 3, "data.meta_keys=[lat]")
