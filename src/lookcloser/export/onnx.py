"""ONNX export of the inference path, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lookcloser.errors import LookcloserError


class _Logits(nn.Module):
    """The Predictor's method as a plain images -> logits graph (no metadata input)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method(images)


def export_onnx(predictor, out: str | Path, opset: int = 18) -> Path:
    """Write the Predictor's graph (RGB in [0, 1], N x 3 x S x S -> logits) to an ONNX file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _Logits(predictor.method).eval().cpu()
    example = torch.rand(2, 3, predictor.image_size, predictor.image_size)
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    tmp.replace(out)
    predictor.method.to(predictor.device)
    return out


def max_abs_difference(
    predictor, onnx_path: str | Path, images: torch.Tensor | None = None
) -> float:
    """Largest |logit| difference between ONNX Runtime and PyTorch on the same inputs."""
    import onnxruntime as ort

    if images is None:
        images = torch.rand(
            4,
            3,
            predictor.image_size,
            predictor.image_size,
            generator=torch.Generator().manual_seed(0),
        )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"images": images.numpy().astype(np.float32)})
    torch_logits = predictor.logits(images).float().cpu().numpy()
    if onnx_logits.shape != torch_logits.shape:
        raise LookcloserError(
            f"ONNX output shape {onnx_logits.shape} != PyTorch {torch_logits.shape}"
        )
    return float(np.abs(onnx_logits - torch_logits).max())
