"""ONNX export of the inference path, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lookcloser.errors import LookcloserError
from lookcloser.fileio import atomic_path


class _Logits(nn.Module):
    """The Predictor's method as a plain graph: images (and metadata, if any) -> logits."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, *meta: torch.Tensor) -> torch.Tensor:
        return self.method(images, *meta)


class _LogitsAndEmbedding(_Logits):
    """Logits and the L2-normalised embedding (the decision classifier's input,
    lookalikes.embed) from one forward."""

    def forward(self, images: torch.Tensor, *meta: torch.Tensor):
        from lookcloser.models.embedding import method_logits_and_features

        logits, features, _, _ = method_logits_and_features(self.method, images, *meta)
        return logits, torch.nn.functional.normalize(features, dim=1)


def example_inputs(predictor, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random graph inputs: images, plus `meta` and a mixed `meta_mask` for meta models."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, predictor.image_size, predictor.image_size, generator=gen)
    if not predictor.meta_keys:
        return (images,)
    k = len(predictor.meta_keys)
    mask = torch.rand(batch, k, generator=gen) > 0.3
    meta = torch.where(mask, torch.randn(batch, k, generator=gen), 0.0)
    return images, meta, mask


def input_names(predictor) -> list[str]:
    """The graph's input names: `images`, then `meta` and `meta_mask` for meta models."""
    return ["images", "meta", "meta_mask"] if predictor.meta_keys else ["images"]


def export_onnx(
    predictor, out: str | Path, opset: int = 18, dynamo: bool = False, embedding: bool = False
) -> Path:
    """Write the Predictor's graph to an ONNX file.

    Inputs: `images` (N x 3 x S x S, RGB in [0, 1]) and, for a model with metadata, `meta`
    (N x K float32, 0 where missing) and `meta_mask` (N x K bool, True where present) in the
    order of model.json's `meta_keys`. Output: `logits` (N x classes); with `embedding`, also
    `embedding` (N x D, L2-normalised: the feature the class decision reads).

    `dynamo=True` traces with torch.export, which knows every size but the batch: "same"
    padding (TF-ported EfficientNets) becomes constant instead of a Shape -> Pad subgraph,
    which ONNX Runtime runs faster and quantizes far better.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = (_LogitsAndEmbedding if embedding else _Logits)(predictor.method).eval().cpu()
    names = input_names(predictor)
    outputs = ["logits", "embedding"] if embedding else ["logits"]
    inputs = example_inputs(predictor, 2)
    # Written beside `out` and moved over it: never half a file, never through a link.
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(
                    model,
                    inputs,
                    input_names=names,
                    output_names=outputs,
                    # images, then the *meta varargs as one tuple (torch.export's structure)
                    dynamic_shapes=(
                        {0: batch},
                        *([tuple({0: batch} for _ in inputs[1:])] if len(inputs) > 1 else []),
                    ),
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
                program.save(str(tmp))
            else:
                torch.onnx.export(
                    model,
                    inputs,
                    str(tmp),
                    input_names=names,
                    output_names=outputs,
                    dynamic_axes={name: {0: "batch"} for name in [*names, *outputs]},
                    opset_version=opset,
                    dynamo=False,
                )
        finally:
            predictor.method.to(predictor.device)
    return out


def max_abs_difference(
    predictor,
    onnx_path: str | Path,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> float:
    """Largest |logit| difference between ONNX Runtime and PyTorch on the same inputs
    (`inputs`: images, then meta and meta_mask for meta models; random when left out)."""
    import onnxruntime as ort

    if inputs is None:
        inputs = example_inputs(predictor, 4)
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        name: tensor.numpy() if tensor.dtype == torch.bool else tensor.numpy().astype(np.float32)
        for name, tensor in zip(input_names(predictor), inputs, strict=True)
    }
    (onnx_logits,) = session.run(["logits"], feed)
    torch_logits = predictor.logits(*inputs).float().cpu().numpy()
    if onnx_logits.shape != torch_logits.shape:
        raise LookcloserError(
            f"ONNX output shape {onnx_logits.shape} != PyTorch {torch_logits.shape}"
        )
    return float(np.abs(onnx_logits - torch_logits).max())
