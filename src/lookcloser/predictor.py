"""The Predictor: the single inference path behind predict, eval, explain, export and serve."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from lookcloser.data.batch import Batch, collate, stack_images
from lookcloser.data.boxes import parse_box, report_missing
from lookcloser.data.files import check_predict_arguments, file_loader
from lookcloser.data.images import (
    DEFAULT_MAX_PIXELS,
    image_errors,
    list_image_files,
    load_image,
)
from lookcloser.data.loading import ImageDataset
from lookcloser.data.meta import meta_tensors, same_path
from lookcloser.data.sources import Sample
from lookcloser.data.transforms import eval_transform
from lookcloser.errors import (
    SKIP_BAD_IMAGES_HINT,
    BadImagesError,
    ConfigError,
    ModelDirError,
)
from lookcloser.methods.base import Method
from lookcloser.modeldir import (
    MODEL_JSON,
    is_ensemble_dir,
    load_weights_file,
    read_model_json,
    weights_file,
    weights_header,
)
from lookcloser.recorded import build_recorded_method, check_model_config
from lookcloser.tta import TTA, average_probabilities


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


class Predictions(list):
    """Predictions in input order; `skipped` holds (path, reason) of images not read;
    `without_box` the images a box file (`boxes`) had no box for (their crop was the whole
    image)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped: list[tuple[str, str]] = []
        self.without_box: list[str] = []


def top_predictions(
    files: Sequence[str], positions: Sequence[int], probs: Tensor, classes: Sequence[str], k: int
) -> list[Prediction]:
    """Prediction (top-k classes) of each image read, from N x C probabilities."""
    values, indices = probs.topk(min(k, len(classes)), dim=1)
    return [
        Prediction(files[n], [classes[j] for j in i], p, i)
        for n, p, i in zip(positions, values.tolist(), indices.tolist(), strict=True)
    ]


# One batch of image files: (positions of its files read, their B x C probabilities or None
# when not predicted, [(position, reason)] of its files not read).
ProbabilityBatch = tuple[list[int], Tensor | None, list[tuple[int, str]]]


def collect_probabilities(
    files: Sequence[str], batches: Iterable[ProbabilityBatch], num_classes: int
) -> tuple[list[int], Tensor, list[tuple[str, str]]]:
    """(positions read, N x C probabilities, [(path, reason)] not read) of a whole stream."""
    positions: list[int] = []
    probs: list[Tensor] = []
    skipped: list[tuple[str, str]] = []
    for indices, batch, failures in batches:
        skipped += [(files[i], reason) for i, reason in failures]
        if batch is not None and indices:
            probs.append(batch)
            positions += indices
    return positions, torch.cat(probs) if probs else torch.empty(0, num_classes), skipped


class PredictionStream:
    """Top-k predictions of image files, one list per batch in input order (iterate once):
    each batch's probabilities are cut to its top-k at once, so memory is flat in the number
    of images.

    `files`: every image file found; `without_box`: those a box mapping had no box for;
    `skipped` grows with the (path, reason) of files not read. With on_bad_image="error" it
    yields nothing from the first batch holding an unreadable file on, reads on to name every
    one, and raises a BadImagesError at its end: batches yielded before stay valid.
    """

    def __init__(
        self,
        files: Sequence[str],
        batches: Iterable[ProbabilityBatch],
        classes: Sequence[str],
        top_k: int,
        on_bad_image: str,
        without_box: Sequence[str] = (),
    ):
        self.files = files
        self.classes = classes
        self.top_k = top_k
        self.on_bad_image = on_bad_image
        self.without_box = list(without_box)
        self.skipped: list[tuple[str, str]] = []
        self._batches: Iterable[ProbabilityBatch] | None = batches

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[list[Prediction]]:
        if self._batches is None:
            raise ConfigError("a PredictionStream is iterated once; call predict_stream again")
        batches, self._batches = self._batches, None
        for positions, probs, failures in batches:
            self.skipped += [(self.files[i], reason) for i, reason in failures]
            if probs is None or not positions or (self.skipped and self.on_bad_image == "error"):
                continue  # nothing (more) to predict; reading goes on to name every bad file
            yield top_predictions(self.files, positions, probs, self.classes, self.top_k)
        if self.skipped and self.on_bad_image == "error":
            raise BadImagesError(self.skipped, len(self.files), SKIP_BAD_IMAGES_HINT)

    def collect(self) -> Predictions:
        """Every prediction in one Predictions list, with `.skipped` and `.without_box`."""
        results = Predictions(p for batch in self for p in batch)
        results.skipped = list(self.skipped)
        results.without_box = list(self.without_box)
        return results


@dataclass
class Explanation:
    """Where the model looked for its answer on one image."""

    image: Image.Image  # the model's input view (resized and cropped)
    heatmap: np.ndarray  # H x W in [0, 1]
    class_name: str
    prob: float
    # Images the method derived from the input to classify (TASN's sampled image), by name.
    views: dict[str, Image.Image] = field(default_factory=dict)
    map_name: str = ""


@dataclass
class EvalOutput:
    """Logits and labels of a whole split, in sample order (with test-time augmentation or
    for an ensemble, `logits` are log-probabilities: their softmax is the averaged
    probabilities)."""

    logits: Tensor
    labels: Tensor
    paths: list[str] = field(default_factory=list)


@dataclass
class OutputBatch:
    """One batch of a split's outputs, in sample order: logits (log-probabilities with TTA or
    for an ensemble), labels and the samples' paths (or shard sample names)."""

    logits: Tensor
    labels: Tensor
    paths: list[str]


def collect_outputs(stream: Iterable[OutputBatch], num_classes: int) -> EvalOutput:
    """One EvalOutput from a stream of batches (for callers that want whole arrays; what
    grows with the split should consume the stream instead)."""
    logits, labels, paths = [], [], []
    for batch in stream:
        logits.append(batch.logits)
        labels.append(batch.labels)
        paths += batch.paths
    if not logits:
        return EvalOutput(torch.empty(0, num_classes), torch.empty(0, dtype=torch.long))
    return EvalOutput(torch.cat(logits), torch.cat(labels), paths)


# Compat: model directories written before training-only parts existed name DCL's saved
# form "dcl-classifier"; it is a `dcl` model without its adversary (same tensors).
LEGACY_METHOD_NAMES = {"dcl-classifier": "dcl"}


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
        max_pixels: int | None = None,
        tta: TTA | str | None = None,
    ):
        self.device = resolve_device(device)
        self.method = method.eval().to(self.device)
        self.classes = list(classes)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self.transform = eval_transform(image_size, crop_pct, interpolation)
        self.tta = tta  # test-time augmentation of predict / eval (None: the plain view)
        self.info = info or {}
        recorded = self.info.get("config", {}).get("data", {}).get("max_image_pixels")
        self.max_pixels = max_pixels or recorded or DEFAULT_MAX_PIXELS
        # The metadata the model takes, in its input order (empty: images only).
        self.meta_keys = list(getattr(method, "meta_keys", []))

    @property
    def tta(self) -> TTA | None:
        """Test-time augmentation applied by predict, run_samples and eval (None: off)."""
        return self._tta

    @tta.setter
    def tta(self, value: TTA | str | None) -> None:
        self._tta = TTA.parse(value)
        self._views = (
            self._tta.views(self.image_size, self.crop_pct, self.interpolation)
            if self._tta
            else None
        )

    @property
    def item_transform(self):
        """Image -> model input: a tensor, or with TTA one tensor of views per scale."""
        return self._views or self.transform

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = "cpu",
        tta: TTA | str | None = None,
        trust_modules: Iterable[str] = (),
    ) -> Predictor:
        """Load a model directory (JSON + safetensors; nothing is unpickled).

        A model directory is untrusted input: every value of model.json is checked as a
        config value is, its files must lie inside it, and it never makes lookcloser import
        code. `trust_modules` names modules its `config.method.module` may import (the user's
        opt-in for a method defined outside lookcloser and its entry points).
        `tta`: test-time augmentation (a spec such as "flip,five_crop" or a TTA); None uses
        the model's default (`tta` in model.json, set by `lookcloser tta-default`), "none"
        turns it off.
        """
        if is_ensemble_dir(model_dir):
            raise ModelDirError(
                f"{model_dir}: an ensemble directory; load it with lookcloser.api.load "
                "(or lookcloser.loader.load_model), which takes both kinds"
            )
        record = read_model_json(model_dir)
        meta_path = Path(model_dir) / MODEL_JSON
        cfg = check_model_config(model_dir, record, trust_modules)
        name = LEGACY_METHOD_NAMES.get(record["method"], record["method"])
        module = {"module": cfg.method["module"]} if cfg.method.get("module") else {}
        cfg.method = {"name": name, **module, **record.get("method_options", {})}
        cfg.data.meta_keys = list(record.get("meta_keys", []))
        # Weights checked (place, size, SHA-256, header) before anything is built from them.
        weights = weights_file(model_dir, record)
        header = weights_header(weights)
        # The method as trained, less its training-only parts: exactly what was saved.
        method = build_recorded_method(meta_path, cfg, len(record["classes"]), header)
        state = load_weights_file(weights)
        try:
            method.load_state_dict(state, strict=True)
        except RuntimeError as err:
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
            max_pixels=cfg.data.max_image_pixels,
            tta=record.get("tta") if tta is None else tta,
        )

    # ---- tensors ------------------------------------------------------------------------------
    @property
    def crop_fusion(self) -> bool:
        """Whether the model fuses object crops (model.crop_fusion): it then takes `crops` cut
        from boxes of the data, and makes its own from its attention otherwise."""
        return getattr(self.method, "crop_fusion", "none") != "none"

    @torch.inference_mode()
    def logits(
        self,
        images: Tensor,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
        crops: Tensor | None = None,
    ) -> Tensor:
        """Logits for a batch of preprocessed images (B x 3 x H x W in [0, 1]).

        For a model with metadata, `meta` (B x K) and `meta_mask` (B x K bool) in the order
        of `meta_keys`; left out, every value counts as missing. For a crop-fusion model,
        `crops` (B x 3 x H x W, preprocessed like the images); left out, the model's attention
        chooses them.
        """
        meta, meta_mask = self._meta_inputs(len(images), meta, meta_mask)
        images = images.to(self.device, non_blocking=True)
        if crops is None:
            return self.method(images, meta, meta_mask)
        if not self.crop_fusion:
            raise ConfigError("crops: this model has no crop fusion (model.crop_fusion=none)")
        crops = crops.to(self.device, non_blocking=True)
        return self.method(images, meta, meta_mask, crops=crops)

    def probabilities(
        self,
        images: Tensor,
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
        crops: Tensor | None = None,
    ) -> Tensor:
        """Softmax class probabilities for a batch of preprocessed images."""
        return self.logits(images, meta, meta_mask, crops).float().softmax(dim=1)

    @torch.inference_mode()
    def batch_probabilities(
        self,
        images: Tensor | list[Tensor],
        meta: Tensor | None = None,
        meta_mask: Tensor | None = None,
        crops: Tensor | None = None,
    ) -> Tensor:
        """B x C probabilities of a batch made by `item_transform`: plain images (B x 3 x H x W)
        or, with TTA, views per scale (B x V x 3 x S x S each), averaged over the views."""
        if isinstance(images, Tensor):
            return self.probabilities(images, meta, meta_mask, crops)
        meta, meta_mask = self._meta_inputs(len(images[0]), meta, meta_mask)
        views = [v.to(self.device, non_blocking=True) for v in images]
        flip = self.tta is not None and self.tta.flip
        return average_probabilities(self.method, views, flip, meta, meta_mask)

    def meta_rows(self, metas: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """N x K values and mask of metadata dicts, in this model's key order."""
        return meta_tensors(metas, self.meta_keys)

    def _meta_inputs(
        self, batch: int, meta: Tensor | None, meta_mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if not self.meta_keys:
            return None, None
        k = len(self.meta_keys)
        if meta is None:
            meta = torch.zeros(batch, k)
            meta_mask = torch.zeros(batch, k, dtype=torch.bool)
        elif meta_mask is None:
            meta_mask = ~torch.isnan(meta)
        if tuple(meta.shape) != (batch, k) or tuple(meta_mask.shape) != (batch, k):
            raise ConfigError(
                f"meta: expected {batch} x {k} values for {', '.join(self.meta_keys)}, "
                f"got {tuple(meta.shape)} and mask {tuple(meta_mask.shape)}"
            )
        meta = torch.where(meta_mask.bool(), meta.float(), 0.0)
        return meta.to(self.device), meta_mask.bool().to(self.device)

    def preprocess(self, image: Image.Image | str | Path) -> Tensor:
        """One image (PIL or file) as a 3 x H x W tensor the model takes."""
        name = "image" if isinstance(image, Image.Image) else image
        if not isinstance(image, Image.Image):
            image = load_image(image, self.max_pixels)
        with image_errors(name):
            return self.transform(image.convert("RGB"))

    # ---- files ---------------------------------------------------------------------------------
    def _check_boxes(self, boxes) -> None:
        if boxes is not None and self.tta is not None:
            raise ConfigError(
                "boxes with test-time augmentation: the views of the crops are not made; "
                "drop the boxes (the model's attention crops each view) or the TTA"
            )

    def _loader(
        self, samples: Sequence[Sample], batch_size: int, num_workers: int, boxes=None
    ) -> DataLoader:
        self._check_boxes(boxes)
        dataset = ImageDataset(
            samples, self.item_transform, self.max_pixels, self.meta_keys, boxes, "boxes"
        )
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
        )

    def _file_meta(
        self, files: Sequence[str], meta: Mapping | Sequence[Mapping] | None
    ) -> tuple[Tensor, Tensor]:
        """Values and mask for each file: from a path -> dict mapping or one dict per file."""
        if meta is None or not self.meta_keys:
            rows: Sequence[Mapping] = [{}] * len(files)
        elif isinstance(meta, Mapping):
            by_path = {same_path(k): v for k, v in meta.items()}
            rows = [by_path.get(same_path(f), {}) for f in files]
            if by_path and files and not any(same_path(f) in by_path for f in files):
                raise ConfigError(
                    f"meta: no entry matches the images (e.g. {next(iter(meta))!r} vs "
                    f"{files[0]!r}); relative paths in a meta file are taken from its folder"
                )
        else:
            rows = list(meta)
            if len(rows) != len(files):
                raise ConfigError(
                    f"meta: {len(rows)} metadata dicts for {len(files)} images; give one per "
                    "image or a mapping of path -> dict"
                )
        return meta_tensors(rows, self.meta_keys, files)

    def predict(
        self,
        paths: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
        boxes: Mapping[str, Sequence[float]] | None = None,
    ) -> Predictions:
        """Top-k predictions for image files and folders (searched recursively), batched.

        `on_bad_image="error"` raises a BadImagesError naming every unreadable file (after
        reading them all); `"skip"` predicts the rest and lists the bad ones in `.skipped`.
        `meta`, for models with metadata: a mapping of image path -> {key: value} or one dict
        per image; keys or images without a value count as missing.
        `boxes`, for crop-fusion models: image path -> [x, y, w, h] in original pixels
        (`data.boxes.read_box_file` reads a box file); images without one get the whole image
        as their crop and are listed in `.without_box`. Left out, the model's attention
        chooses the crops.
        """
        return self.predict_stream(
            paths, top_k, batch_size, num_workers, on_bad_image, meta, boxes
        ).collect()

    def predict_stream(
        self,
        paths: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
        boxes: Mapping[str, Sequence[float]] | None = None,
    ) -> PredictionStream:
        """`predict` batch by batch: a PredictionStream yielding each batch's top-k
        predictions as it is predicted (memory flat in the number of images). Arguments,
        files, metadata and boxes are checked here, before the first batch; with
        on_bad_image="error" the batches before the first bad image are yielded, then the
        stream reads on and raises a BadImagesError naming every bad file."""
        check_predict_arguments(top_k, batch_size, on_bad_image)
        files = [str(f) for p in paths for f in list_image_files(p)]
        per_file = self._file_boxes(files, boxes)
        batches = self.file_probability_batches(
            files, batch_size, num_workers, on_bad_image, meta, per_file
        )
        without_box = report_missing(files, per_file, "boxes") if per_file is not None else []
        return PredictionStream(files, batches, self.classes, top_k, on_bad_image, without_box)

    def _file_boxes(self, files: Sequence[str], boxes: Mapping | None) -> list | None:
        """One box (or None) per file from a path -> box mapping; None without boxes."""
        if boxes is None:
            return None
        if not self.crop_fusion:
            raise ConfigError("boxes: this model has no crop fusion (model.crop_fusion=none)")
        by_path = {same_path(k): parse_box(v, f"boxes: entry {k!r}") for k, v in boxes.items()}
        per_file = [by_path.get(same_path(f)) for f in files]
        if by_path and files and all(b is None for b in per_file):
            raise ConfigError(
                f"boxes: no entry matches the images (e.g. {next(iter(boxes))!r} vs "
                f"{files[0]!r}); relative paths in a box file are taken from its folder"
            )
        return per_file

    def file_probabilities(
        self,
        files: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
        boxes: Sequence | None = None,
    ) -> tuple[list[int], Tensor, list[tuple[str, str]]]:
        """Class probabilities of image files: (positions of the files read, their N x C
        probabilities, [(path, reason)] of the files not read). With `on_bad_image="error"`,
        prediction stops at the first bad file but reading goes on, to name them all.
        `boxes`: one [x, y, w, h] or None per file, for crop-fusion models."""
        batches = self.file_probability_batches(
            files, batch_size, num_workers, on_bad_image, meta, boxes
        )
        return collect_probabilities(files, batches, len(self.classes))

    def file_probability_batches(
        self,
        files: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
        boxes: Sequence | None = None,
    ) -> Iterator[ProbabilityBatch]:
        """`file_probabilities` batch by batch: (positions of the batch's files read, their
        B x C probabilities, [(position, reason)] of its files not read). With
        `on_bad_image="error"` the probabilities are None from the first batch holding a bad
        file on. Metadata and boxes are checked on the call, before the first batch."""
        values, mask = self._file_meta(files, meta)
        self._check_boxes(boxes)
        loader = file_loader(
            files, self.item_transform, self.max_pixels, batch_size, num_workers, boxes
        )
        return self._probability_batches(loader, on_bad_image, values, mask)

    def _probability_batches(
        self, loader: DataLoader, on_bad_image: str, values: Tensor, mask: Tensor
    ) -> Iterator[ProbabilityBatch]:
        bad = False
        for indices, images, failures in loader:
            bad = bad or bool(failures)
            if (bad and on_bad_image == "error") or not indices:
                yield indices, None, failures  # keep reading to name every bad file
                continue
            images, crops = images if isinstance(images, tuple) else (images, None)
            probs = self.batch_probabilities(images, values[indices], mask[indices], crops)
            yield indices, probs.cpu(), failures

    def embed(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping[str, Mapping] | Sequence[Mapping] | None = None,
    ):
        """L2-normalised embeddings of image files and folders: the feature the class
        decision reads, with the predicted class and its probability from the same pass
        (the plain view: no TTA). Returns a `lookcloser.embeddings.EmbeddingStream` yielding
        batches (memory flat in the number of images); `on_bad_image` as for `predict`.
        A folder without images is a DataError naming it."""
        from lookcloser.embeddings import embed_files

        return embed_files(self, paths, batch_size, num_workers, on_bad_image, meta)

    def predict_images(
        self,
        images: Sequence[Image.Image],
        top_k: int = 5,
        names: Sequence[str] | None = None,
        meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Prediction]:
        """Top-k predictions for images in memory (PIL), with this predictor's TTA; `names`
        label them in the results, `meta` holds one metadata dict per image."""
        check_predict_arguments(top_k, 1, "error")
        names = list(names) if names is not None else [f"image-{i}" for i in range(len(images))]
        if not images:
            return []
        probs = self.image_probabilities(images, meta)
        return top_predictions(names, range(len(images)), probs, self.classes, top_k)

    def image_probabilities(
        self, images: Sequence[Image.Image], meta: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        """N x C class probabilities of images in memory (PIL), with this predictor's TTA."""
        values, mask = self.meta_rows(list(meta) if meta is not None else [{}] * len(images))
        tensors = []
        for i, image in enumerate(images):
            with image_errors(f"image {i}"):
                tensors.append(self.item_transform(image.convert("RGB")))
        return self.batch_probabilities(stack_images(tensors), values, mask).cpu()

    def run_samples(
        self,
        samples: Sequence[Sample],
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        description: str = "evaluate",
        boxes: Sequence | None = None,
    ) -> EvalOutput:
        """Logits for labelled samples (the inference path that `eval` measures); `boxes`:
        one [x, y, w, h] or None per sample, for crop-fusion models (data/boxes.py)."""
        stream = self.stream_samples(samples, batch_size, num_workers, progress, description, boxes)
        return collect_outputs(stream, len(self.classes))

    def stream_samples(
        self,
        samples: Sequence[Sample],
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        description: str = "evaluate",
        boxes: Sequence | None = None,
    ) -> Iterator[OutputBatch]:
        """`run_samples` batch by batch: memory flat in the number of samples."""
        loader = self._loader(samples, batch_size, num_workers, boxes)
        done = 0
        for logits, labels in self.stream_batches(loader, progress, description):
            # The loader keeps the samples' order and skips none (they were verified).
            paths = [s.path for s in samples[done : done + len(labels)]]
            done += len(labels)
            yield OutputBatch(logits, labels, paths)

    def run_batches(
        self, batches: Iterable[Batch], progress: bool = True, description: str = "evaluate"
    ) -> EvalOutput:
        """Logits for Batches made with `self.item_transform` (labels from their targets)."""
        stream = (
            OutputBatch(*out, []) for out in self.stream_batches(batches, progress, description)
        )
        return collect_outputs(stream, len(self.classes))

    def stream_batches(
        self, batches: Iterable[Batch], progress: bool = True, description: str = "evaluate"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits, labels) of each Batch made with `self.item_transform`, as they come."""
        from lookcloser.progress import track

        for batch in track(batches, description, enabled=progress):
            if isinstance(batch.images, Tensor):
                out = self.logits(batch.images, batch.meta, batch.meta_mask, batch.crops)
            else:  # test-time views: the log of the averaged probabilities
                out = self.batch_probabilities(batch.images, batch.meta, batch.meta_mask).log()
            yield out.float().cpu(), batch.targets

    def explain(
        self,
        image: str | Path | Image.Image,
        target: int | str | None = None,
        map_name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        part: int | None = None,
    ) -> Explanation:
        """The method's attention map for one image (Grad-CAM unless the method has its own).

        `meta`: the image's metadata dict, for models with metadata (missing keys are masked).
        `part`: part map K and its view, for methods with part maps (TASN).
        """
        tensor = self.preprocess(image).unsqueeze(0).to(self.device)
        values, mask = self._meta_inputs(1, *self.meta_rows([meta or {}]))
        probs = self.probabilities(tensor, values, mask)[0]
        if isinstance(target, str):
            if target not in self.classes:
                raise ConfigError(
                    f"target: unknown class {target!r}; the model's classes: {', '.join(self.classes)}"
                )
            target = self.classes.index(target)
        if target is not None and not 0 <= int(target) < len(self.classes):
            raise ConfigError(
                f"target: class index {target} out of range; expected 0..{len(self.classes) - 1}"
            )
        index = int(probs.argmax()) if target is None else int(target)
        target_index = torch.tensor([index], device=self.device)
        maps = self.method.explain_maps(tensor, target_index, values, mask, part=part)
        if map_name is not None and map_name not in maps:
            raise ConfigError(f"map: unknown map {map_name!r}; this model has: {', '.join(maps)}")
        map_name = map_name or next(iter(maps))
        with torch.no_grad():
            views = self.method.explain_views(tensor, part=part)
        return Explanation(
            _picture(tensor[0]),
            maps[map_name][0].detach().cpu().numpy(),
            self.classes[index],
            float(probs[index]),
            {name: _picture(view[0]) for name, view in views.items()},
            map_name,
        )


def _picture(image: Tensor) -> Image.Image:
    """A 3 x H x W tensor in [0, 1] as an RGB picture."""
    return Image.fromarray(
        (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    )
