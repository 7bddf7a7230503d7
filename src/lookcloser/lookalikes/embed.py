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

import csv
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lookcloser.data.images import list_image_files
from lookcloser.errors import (
    SKIP_BAD_IMAGES_HINT,
    BadImagesError,
    ConfigError,
    DataError,
)
from lookcloser.fileio import atomic_open, atomic_path
from lookcloser.models.embedding import (  # noqa: F401  (re-exported: the model-level part)
    ClassifierCall,
    decision_call,
    is_classifier,
    method_logits_and_features,
    watch_classifiers,
)

# Rows buffered before a Parquet row group is written (memory stays flat in the image count).
PARQUET_ROWS = 1024
FORMATS = (".parquet", ".npy")


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
        from lookcloser.predictor import check_predict_arguments

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
        from lookcloser.predictor import _collate_files, _FileDataset

        p = self.predictor
        values, mask = p._file_meta(self.files, self.meta)
        loader = DataLoader(
            _FileDataset(self.files, p.transform, p.max_pixels),  # the plain view, never TTA
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate_files,
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


# ---- writing ---------------------------------------------------------------------------------------
@dataclass
class EmbeddingsWritten:
    """What `write_embeddings` wrote."""

    files: list[Path]
    rows: int
    dim: int
    skipped: list[tuple[str, str]]


def check_output(out: str | Path) -> Path:
    """ConfigError unless `out` ends in .parquet or .npy."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(
            f"--out {out}: expected a .parquet file (pyarrow) or a .npy file (with a .csv "
            "beside it for paths, classes and scores)"
        )
    return out


def write_embeddings(stream: EmbeddingStream, out: str | Path, classes: Sequence[str]):
    """Stream the embeddings to `out`: Parquet (columns path, class, class_index, score,
    embedding), or `.npy` (N x D float32) with `<stem>.csv` beside it (row, path, class,
    score). Written beside and moved into place: a failure leaves no file."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        return _write_parquet(stream, out, classes)
    return _write_npy(stream, out, classes)


def _write_parquet(stream: EmbeddingStream, out: Path, classes: Sequence[str]):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency
        raise ConfigError("--out .parquet needs pyarrow (pip install pyarrow)") from None
    rows, dim, writer, buffered = 0, 0, None, []

    def flush(tmp: Path):
        nonlocal writer
        if not buffered:
            return
        batch = _concat(buffered)
        buffered.clear()
        values = pa.array(batch.embeddings.reshape(-1), type=pa.float32())
        table = pa.table(
            {
                "path": pa.array(batch.paths, type=pa.string()),
                "class": pa.array([classes[i] for i in batch.indices], type=pa.string()),
                "class_index": pa.array(batch.indices.astype(np.int32)),
                "score": pa.array(batch.scores.astype(np.float32)),
                "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(str(tmp), table.schema)
        writer.write_table(table)

    with atomic_path(out) as tmp:
        try:
            for batch in stream:
                dim = batch.embeddings.shape[1]
                rows += len(batch.paths)
                buffered.append(batch)
                if sum(len(b.paths) for b in buffered) >= PARQUET_ROWS:
                    flush(tmp)
            flush(tmp)
            if writer is None:  # no image read: an empty table of the same columns
                schema = pa.schema(
                    [
                        ("path", pa.string()),
                        ("class", pa.string()),
                        ("class_index", pa.int32()),
                        ("score", pa.float32()),
                        ("embedding", pa.list_(pa.float32(), 0)),
                    ]
                )
                writer = pq.ParquetWriter(str(tmp), schema)
        finally:
            if writer is not None:
                writer.close()
    return EmbeddingsWritten([out], rows, dim, list(stream.skipped))


def _concat(batches: list[EmbeddingBatch]) -> EmbeddingBatch:
    return EmbeddingBatch(
        [p for b in batches for p in b.paths],
        np.concatenate([b.embeddings for b in batches]),
        np.concatenate([b.logits for b in batches]),
        np.concatenate([b.indices for b in batches]),
        np.concatenate([b.scores for b in batches]),
    )


def _write_npy(stream: EmbeddingStream, out: Path, classes: Sequence[str]):
    table = out.with_suffix(".csv")
    rows, dim, array = 0, 0, None
    with atomic_open(table, "w", newline="") as f, atomic_path(out) as tmp:
        writer = csv.writer(f)
        writer.writerow(["row", "path", "class", "score"])
        for batch in stream:
            if array is None:  # the width is known from the first batch
                dim = batch.embeddings.shape[1]
                array = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(len(stream), dim)
                )
            array[rows : rows + len(batch.paths)] = batch.embeddings
            for path, index, score in zip(batch.paths, batch.indices, batch.scores, strict=True):
                writer.writerow([rows, path, classes[int(index)], f"{float(score):.6f}"])
                rows += 1
        if array is None:
            with open(tmp, "wb") as empty:  # np.save(name) would add its own suffix
                np.save(empty, np.zeros((0, 0), dtype=np.float32))
        else:
            array.flush()
            if rows < len(array):  # skipped images: the rows written, in a file of their own
                _shrink(tmp, array, rows)
            del array
    return EmbeddingsWritten([out, table], rows, dim, list(stream.skipped))


def _shrink(tmp: Path, array: np.memmap, rows: int, chunk: int = 4096) -> None:
    """Replace the .npy at `tmp` by its first `rows` rows, copied in chunks."""
    smaller = tmp.with_name(tmp.name + ".rows")
    try:
        target = np.lib.format.open_memmap(
            smaller, mode="w+", dtype=np.float32, shape=(rows, array.shape[1])
        )
        for start in range(0, rows, chunk):
            target[start : start + chunk] = array[start : min(start + chunk, rows)]
        target.flush()
        del target
        smaller.replace(tmp)
    finally:
        smaller.unlink(missing_ok=True)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    """(N x D embeddings, one dict per row: path, class, score) of a file `write_embeddings`
    wrote (Parquet, or .npy with its .csv)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = table.column("embedding").combine_chunks()
        dim = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        rows = [
            {"path": p, "class": c, "score": s}
            for p, c, s in zip(
                table.column("path").to_pylist(),
                table.column("class").to_pylist(),
                table.column("score").to_pylist(),
                strict=True,
            )
        ]
        return values.reshape(len(rows), dim), rows
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    with open(path.with_suffix(".csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return np.asarray(array), rows


def onnx_differences(predictor, onnx_path: str | Path, inputs=None) -> tuple[float, float]:
    """Largest |difference| of the logits and of the embeddings between an ONNX graph written
    with `export_onnx(..., embedding=True)` (ONNX Runtime) and PyTorch, on the same inputs
    (random images when left out)."""
    import onnxruntime as ort

    from lookcloser.export.onnx import example_inputs, input_names

    inputs = example_inputs(predictor, 4) if inputs is None else inputs
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        name: t.numpy() if t.dtype == torch.bool else t.numpy().astype(np.float32)
        for name, t in zip(input_names(predictor), inputs, strict=True)
    }
    logits, embeddings = session.run(["logits", "embedding"], feed)
    want_logits, want = embed_tensors(predictor, *inputs)
    return (
        float(np.abs(logits - want_logits.numpy()).max()),
        float(np.abs(embeddings - want.numpy()).max()),
    )


def export_embedding_onnx(model_dir: str | Path, out: str | Path | None = None):
    """Export a model directory's graph with the `embedding` output beside `logits`
    (default MODEL_DIR/model.onnx) and check both against PyTorch: (file, max |logit|
    difference, max |embedding| difference)."""
    from lookcloser.export.onnx import export_onnx
    from lookcloser.predictor import Predictor

    predictor = Predictor.load(model_dir, tta="none")
    out = Path(out) if out else Path(model_dir) / "model.onnx"
    export_onnx(predictor, out, embedding=True)
    return (out, *onnx_differences(predictor, out))
