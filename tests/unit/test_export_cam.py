"""ONNX export checked with ONNX Runtime, and Grad-CAM maps."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lookcloser.config import Config
from lookcloser.explain.cam import grad_cam, normalize_maps
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import build_method
from lookcloser.predictor import Predictor

SIZE = 64


def _method(backbone: str = "test_efficientnet", classes: int = 3):
    torch.manual_seed(0)
    cfg = Config.load(None, [f"model.backbone={backbone}", "model.pretrained=false"])
    return build_method(cfg, classes)


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
