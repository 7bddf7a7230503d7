"""Embeddings: the feature a model's class decision reads, L2-normalised, for every image.

Which feature that is differs by method (the baseline's head reads the pooled backbone map,
DCN's head its top layer's mean, RA-CNN's fusion head the normalised scale features joined,
a crop-fusion head the image's and crop's features joined, a metadata-fusion head the fused
vector), so it is not recomputed here: every class classifier of the method (a linear,
cosine or prototype layer) is watched during the ordinary forward, and the embedding is the
input of the call whose output *is* the logits the method returns. One forward gives the
prediction and the embedding, for every method and head without code of their own.

A method whose prediction sums several heads (RAMS-Trans, RA-CNN with `predict_from=sum`)
has no such call; its embedding is then the whole image's feature as `forward_head` reads it
(one more pass), and `exact` is False: enrollment refuses such a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lookcloser.data.files import check_predict_arguments, file_loader
from lookcloser.data.images import list_image_files
from lookcloser.errors import SKIP_BAD_IMAGES_HINT, BadImagesError, DataError
from lookcloser.models.embedding import method_logits_and_features


@torch.inference_mode()
def embed_tensors(
    predictor, images: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(logits B x C, L2-normalised embeddings B x D) of preprocessed images, on the CPU."""
    meta, meta_mask = predictor._meta_inputs(len(images), meta, meta_mask)
    images = images.to(predictor.device, non_blocking=True)
    logits, features, _, _ = method_logits_and_features(predictor.method, images, meta, meta_mask)
    return logits.float().cpu(), F.normalize(features.float(), dim=1).cpu()


def embedding_info(predictor) -> dict[str, Any]:
    """What a model's embedding is: its width, the classifier that reads it, and whether it is
    exactly the prediction's input (one dry run on a blank image)."""
    size = predictor.image_size
    blank = torch.zeros(1, 3, size, size, device=predictor.device)
    meta, mask = predictor._meta_inputs(1, None, None)
    with torch.inference_mode():
        _, features, name, exact = method_logits_and_features(predictor.method, blank, meta, mask)
    return {"dim": int(features.shape[1]), "classifier": name, "exact": exact}


# ---- files --------------------------------------------------------------------------------------
@dataclass
class EmbeddingBatch:
    """Embeddings of one batch of image files, with the prediction made in the same pass."""

    paths: list[str]
    embeddings: np.ndarray  # B x D float32, unit rows
    logits: np.ndarray  # B x C float32
    indices: np.ndarray  # B: the predicted class
    scores: np.ndarray  # B: its softmax probability
    positions: list[int] = field(default_factory=list)  # of the files in the input list


def image_files(paths: Iterable[str | Path]) -> list[str]:
    """Every image file of the paths (folders searched recursively); DataError for a folder
    without any."""
    files: list[str] = []
    for path in paths:
        found = list_image_files(path)
        if not found:
            raise DataError(f"{path}: no image files (folders are searched recursively)")
        files += [str(f) for f in found]
    return files


class EmbeddingStream:
    """Embeddings of image files, batch by batch (iterate once). With on_bad_image="error" the
    iteration stops producing at the first unreadable file, reads on to name every one, and
    raises a BadImagesError at its end; with "skip", `.skipped` lists (path, reason)."""

    def __init__(
        self,
        predictor,
        files: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_image: str = "error",
        meta: Mapping | Sequence[Mapping] | None = None,
    ):
        check_predict_arguments(1, batch_size, on_bad_image)
        self.predictor = predictor
        self.files = list(files)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_image = on_bad_image
        self.meta = meta
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[EmbeddingBatch]:
        p = self.predictor
        values, mask = p._file_meta(self.files, self.meta)
        # The plain view (p.transform), never TTA.
        loader = file_loader(
            self.files, p.transform, p.max_pixels, self.batch_size, self.num_workers
        )
        self.skipped = []
        for indices, images, failures in loader:
            self.skipped += [(self.files[i], reason) for i, reason in failures]
            if (self.skipped and self.on_bad_image == "error") or not indices:
                continue
            logits, embeddings = embed_tensors(p, images, values[indices], mask[indices])
            probs = logits.softmax(dim=1)
            scores, predicted = probs.max(dim=1)
            yield EmbeddingBatch(
                [self.files[i] for i in indices],
                embeddings.numpy(),
                logits.numpy(),
                predicted.numpy(),
                scores.numpy(),
                list(indices),
            )
        if self.skipped and self.on_bad_image == "error":
            raise BadImagesError(self.skipped, len(self.files), SKIP_BAD_IMAGES_HINT)


def embed_files(
    predictor,
    paths: Iterable[str | Path],
    batch_size: int = 32,
    num_workers: int = 0,
    on_bad_image: str = "error",
    meta: Mapping | Sequence[Mapping] | None = None,
) -> EmbeddingStream:
    """The EmbeddingStream of image files and folders (searched recursively)."""
    return EmbeddingStream(
        predictor, image_files(paths), batch_size, num_workers, on_bad_image, meta
    )
