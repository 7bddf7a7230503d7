"""What the server runs: a model behind one small interface, on PyTorch or ONNX Runtime.

A backend turns decoded images into class probabilities (in batches) and explains one image.
`load_backend` picks the backend for a directory: today a model directory (model.json); an
ensemble directory plugs in as a second Backend subclass chosen there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lookcloser.errors import ConfigError, ModelDirError
from lookcloser.evaluation import CONFIDENCE_KEY, CONFIDENCE_NOTE_KEY, threshold_note
from lookcloser.modeldir import backup_note, is_model_dir
from lookcloser.predictor import Explanation, Predictor

# Used when the model directory has no validation metrics to choose the threshold from, or
# only ones from a split too small to set it (evaluation.MIN_CONFIDENCE_IMAGES): a floor.
DEFAULT_UNSURE_BELOW = 0.5


class Backend:
    """A model as the server sees it: preprocessing, batched probabilities, explanations."""

    name = "backend"

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.classes = predictor.classes
        self.meta_keys = predictor.meta_keys
        self.max_pixels = predictor.max_pixels
        self._map_names: list[str] | None = None
        self.model_dir: Path | None = None  # set by load_backend (where a gallery may be)

    def preprocess(self, image: Image.Image) -> Tensor:
        """A decoded RGB image as the 3 x S x S tensor the model takes."""
        return self.predictor.preprocess(image)

    def meta_row(self, meta: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """One request's metadata dict as (values, mask) rows (K each); DataError if not numbers."""
        values, mask = self.predictor.meta_rows([meta])
        return values[0], mask[0]

    def probabilities(self, images: Tensor, meta: Tensor, meta_mask: Tensor) -> Tensor:
        """B x classes softmax probabilities of a batch of preprocessed images."""
        raise NotImplementedError

    def explain(
        self,
        image: Image.Image,
        map_name: str | None = None,
        target: str | None = None,
        meta: Mapping[str, Any] | None = None,
        part: int | None = None,
    ) -> Explanation:
        """The method's map for one image (runs the PyTorch model: Grad-CAM needs gradients)."""
        return self.predictor.explain(image, target, map_name, meta, part)

    def embed(self, images: Tensor, meta: Tensor, meta_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, L2-normalised embeddings) of preprocessed images, from the PyTorch model
        of the directory (lookalikes.embed)."""
        from lookcloser.embeddings import embed_tensors

        return embed_tensors(self.predictor, images, meta, meta_mask)

    def map_names(self) -> list[str]:
        """The names of the maps `explain` can show, the default first (found by one dry run)."""
        if self._map_names is None:
            p = self.predictor
            blank = torch.zeros(1, 3, p.image_size, p.image_size, device=p.device)
            values, mask = p._meta_inputs(1, *p.meta_rows([{}]))
            maps = p.method.explain_maps(blank, torch.tensor([0], device=p.device), values, mask)
            self._map_names = list(maps)
        return self._map_names

    def describe(self) -> dict[str, Any]:
        """What GET /model reports about the model itself."""
        record = self.predictor.info
        return {
            "method": record.get("method"),
            "backbone": record.get("backbone"),
            "classes": self.classes,
            "preprocessing": record.get("preprocessing", {"image_size": self.predictor.image_size}),
            "meta_keys": self.meta_keys,
            "metrics": record.get("metrics", {}),
            "maps": self.map_names(),
            "parts": self.predictor.method.part_count(),
            "backend": self.name,
        }

    def unsure_below(self) -> tuple[float, str]:
        """The top-1 probability under which an answer is flagged unsure, and where it came from."""
        val = self.predictor.info.get("metrics", {}).get("val", {})
        images = val.get("images")
        # A model directory from before the minimum was enforced may hold a threshold set on a
        # tiny split: the same rule applies to it.
        too_few = val.get(CONFIDENCE_NOTE_KEY) or (
            threshold_note(images, "val") if isinstance(images, int) else None
        )
        if CONFIDENCE_KEY in val and too_few:
            return DEFAULT_UNSURE_BELOW, f"default {DEFAULT_UNSURE_BELOW}: {too_few}"
        if val.get(CONFIDENCE_KEY) is not None:
            return float(val[CONFIDENCE_KEY]), (
                f"validation split: predictions at or above it were right at least 90 % of the time "
                f"({val.get('images', '?')} images, model.json metrics.val.{CONFIDENCE_KEY})"
            )
        return DEFAULT_UNSURE_BELOW, (
            f"default {DEFAULT_UNSURE_BELOW}: the model directory records no validation "
            f"{CONFIDENCE_KEY} (trained without a val split, or before it was recorded)"
        )


class TorchBackend(Backend):
    """The Predictor's own PyTorch model."""

    name = "torch"

    def probabilities(self, images: Tensor, meta: Tensor, meta_mask: Tensor) -> Tensor:
        return self.predictor.probabilities(images, meta, meta_mask).cpu()


class OnnxBackend(Backend):
    """An ONNX graph of the model (what `lookcloser export` writes) on ONNX Runtime.

    Preprocessing is the Predictor's, so both backends see the same tensors. Explanations
    run the PyTorch model of the same directory: ONNX graphs carry no gradients for Grad-CAM.
    """

    name = "onnx"

    def __init__(self, predictor: Predictor, onnx_path: str | Path, threads: int | None = None):
        super().__init__(predictor)
        import onnxruntime as ort

        from lookcloser.export.onnx import input_names

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise ModelDirError(
                f"{self.onnx_path}: no ONNX file; write it with `lookcloser export "
                f"{self.onnx_path.parent}` or name one with --onnx FILE"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        expected = input_names(predictor)
        found = [i.name for i in self.session.get_inputs()]
        if found != expected:
            raise ModelDirError(
                f"{self.onnx_path}: graph inputs {found}, expected {expected} for this model"
            )
        shape = self.session.get_inputs()[0].shape
        size = predictor.image_size
        if list(shape[1:]) != [3, size, size]:
            raise ModelDirError(
                f"{self.onnx_path}: takes images of shape {shape[1:]}, the model directory "
                f"says 3 x {size} x {size}; export again from this directory"
            )
        self.input_names = expected

    def probabilities(self, images: Tensor, meta: Tensor, meta_mask: Tensor) -> Tensor:
        feed = {"images": images.numpy().astype(np.float32)}
        if self.meta_keys:
            feed["meta"] = torch.where(meta_mask, meta, 0.0).numpy().astype(np.float32)
            feed["meta_mask"] = meta_mask.numpy()
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(logits).float().softmax(dim=1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "onnx_file": str(self.onnx_path)}


def load_backend(
    path: str | Path,
    backend: str = "torch",
    onnx_file: str | Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> Backend:
    """The backend for a model directory: `torch`, or `onnx` (MODEL_DIR/model.onnx unless
    `onnx_file` names another graph of the same model)."""
    if backend not in ("torch", "onnx"):
        raise ConfigError(f"--backend: expected 'torch' or 'onnx', got {backend!r}")
    if not is_model_dir(path):
        # Ensemble directories will be recognised here, with a Backend of their own.
        raise ModelDirError(f"{path}: not a model directory (no model.json){backup_note(path)}")
    predictor = Predictor.load(path, device)
    if backend == "torch":
        if onnx_file is not None:
            raise ConfigError("--onnx: only with --backend onnx")
        served: Backend = TorchBackend(predictor)
    else:
        served = OnnxBackend(predictor, onnx_file or Path(path) / "model.onnx", threads)
    served.model_dir = Path(path)
    return served
