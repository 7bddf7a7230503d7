"""The Predictor: the single inference path behind predict, eval, explain, export and serve."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from lookcloser.config import Config
from lookcloser.data.images import list_image_files, load_image
from lookcloser.data.sources import Sample
from lookcloser.data.transforms import eval_transform
from lookcloser.engine.datamodule import ImageDataset, collate
from lookcloser.methods import build_method
from lookcloser.methods.base import Method
from lookcloser.modeldir import read_model_json, read_weights


@dataclass
class Prediction:
    """Top-k classes of one image."""

    path: str
    classes: list[str]
    probs: list[float]
    indices: list[int]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        top = [
            {"class": c, "index": i, "prob": round(p, 6)}
            for c, i, p in zip(self.classes, self.indices, self.probs, strict=True)
        ]
        return {"path": self.path, "top": top}


@dataclass
class Explanation:
    """Where the model looked for its answer on one image."""

    image: Image.Image  # the model's input view (resized and cropped)
    heatmap: np.ndarray  # H x W in [0, 1]
    class_name: str
    prob: float


@dataclass
class EvalOutput:
    """Logits and labels of a whole split, in sample order."""

    logits: Tensor
    labels: Tensor
    paths: list[str] = field(default_factory=list)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A trained method plus its preprocessing; loads from a model directory."""

    def __init__(
        self,
        method: Method,
        classes: Sequence[str],
        image_size: int,
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
        device: str | torch.device | None = "cpu",
        info: dict[str, Any] | None = None,
    ):
        self.device = resolve_device(device)
        self.method = method.eval().to(self.device)
        self.classes = list(classes)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.transform = eval_transform(image_size, crop_pct, interpolation)
        self.info = info or {}

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device | None = "cpu") -> Predictor:
        """Load a model directory (JSON + safetensors; nothing is unpickled)."""
        record = read_model_json(model_dir)
        cfg = Config.from_dict(record["config"], where=f"{model_dir}/model.json")
        cfg.method = {"name": record["method"], **record.get("method_options", {})}
        method = build_method(cfg, len(record["classes"]), pretrained=False)
        state = read_weights(model_dir, record)
        try:
            method.load_state_dict(state, strict=True)
        except RuntimeError as err:
            from lookcloser.errors import ModelDirError

            raise ModelDirError(
                f"{model_dir}: weights do not fit the recorded model: {err}"
            ) from None
        pre = record["preprocessing"]
        return cls(
            method,
            record["classes"],
            pre["image_size"],
            pre.get("crop_pct", 1.0),
            pre.get("interpolation", "bicubic"),
            device,
            record,
        )

    # ---- tensors ------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """Logits for a batch of preprocessed images (B x 3 x H x W in [0, 1])."""
        return self.method(images.to(self.device, non_blocking=True))

    def probabilities(self, images: Tensor) -> Tensor:
        """Softmax class probabilities for a batch of preprocessed images."""
        return self.logits(images).float().softmax(dim=1)

    def preprocess(self, image: Image.Image | str | Path) -> Tensor:
        """One image (PIL or file) as a 3 x H x W tensor the model takes."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return self.transform(image.convert("RGB"))

    # ---- files ---------------------------------------------------------------------------------
    def _loader(self, samples: Sequence[Sample], batch_size: int, num_workers: int) -> DataLoader:
        dataset = ImageDataset(samples, self.transform, max_pixels=self._max_pixels())
        dataset.meta_keys = []  # inference needs no metadata tensors
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
        )

    def _max_pixels(self) -> int:
        return self.info.get("config", {}).get("data", {}).get("max_image_pixels", 89_478_485)

    def predict(
        self,
        paths: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> list[Prediction]:
        """Top-k predictions for image files and folders (searched recursively), batched."""
        files = [str(f) for p in paths for f in list_image_files(p)]
        samples = [Sample(f, -1) for f in files]
        k = min(top_k, len(self.classes))
        results: list[Prediction] = []
        for images, _, _ in self._loader(samples, batch_size, num_workers):
            probs, idx = self.probabilities(images).topk(k, dim=1)
            for p, i in zip(probs.tolist(), idx.tolist(), strict=True):
                path = files[len(results)]
                results.append(Prediction(path, [self.classes[j] for j in i], p, i))
        return results

    def run_samples(
        self,
        samples: Sequence[Sample],
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        description: str = "evaluate",
    ) -> EvalOutput:
        """Logits for labelled samples (the inference path that `eval` measures)."""
        loader = self._loader(samples, batch_size, num_workers)
        out = self.run_batches(loader, progress, description)
        out.paths = [s.path for s in samples]
        return out

    def run_batches(
        self, batches: Iterable, progress: bool = True, description: str = "evaluate"
    ) -> EvalOutput:
        """Logits for (images, labels, ...) batches preprocessed with `self.transform`."""
        from lookcloser.progress import track

        logits, labels = [], []
        for images, batch_labels, *_ in track(batches, description, enabled=progress):
            logits.append(self.logits(images).float().cpu())
            labels.append(batch_labels)
        if not logits:
            empty = torch.empty(0, len(self.classes))
            return EvalOutput(empty, torch.empty(0, dtype=torch.long))
        return EvalOutput(torch.cat(logits), torch.cat(labels))

    def explain(
        self,
        image: str | Path | Image.Image,
        target: int | str | None = None,
        map_name: str | None = None,
    ) -> Explanation:
        """The method's attention map for one image (Grad-CAM unless the method has its own)."""
        tensor = self.preprocess(image).unsqueeze(0).to(self.device)
        probs = self.probabilities(tensor)[0]
        if isinstance(target, str):
            if target not in self.classes:
                raise ValueError(f"unknown class {target!r}")
            target = self.classes.index(target)
        index = int(probs.argmax()) if target is None else int(target)
        maps = self.method.attention_maps(tensor, torch.tensor([index], device=self.device))
        if map_name is not None and map_name not in maps:
            raise ValueError(f"unknown map {map_name!r}; this model has: {', '.join(maps)}")
        heatmap = maps[map_name or next(iter(maps))][0]
        view = Image.fromarray(
            (tensor[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        )
        return Explanation(
            view, heatmap.detach().cpu().numpy(), self.classes[index], float(probs[index])
        )
