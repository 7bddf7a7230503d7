"""Embeddings written to files (Parquet, or .npy with a CSV beside it) and the embedding
output of exported ONNX models. What an embedding is, and the stream that computes one per
image, live in `lookcloser.embeddings` (below the Predictor, which offers `embed`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lookcloser.embeddings import EmbeddingBatch, EmbeddingStream, embed_tensors
from lookcloser.errors import ConfigError
from lookcloser.fileio import atomic_open, atomic_path

# Rows buffered before a Parquet row group is written (memory stays flat in the image count).
PARQUET_ROWS = 1024
FORMATS = (".parquet", ".npy")


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
