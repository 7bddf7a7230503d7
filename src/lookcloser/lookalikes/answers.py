"""Answers with look-alikes: the nearest references of the predicted class and of the
runner-up, and the open-set decision, for predict, explain and the server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from lookcloser.data.meta import same_path
from lookcloser.embeddings import EmbeddingStream
from lookcloser.errors import BadImageError, ConfigError
from lookcloser.lookalikes.gallery import Lookalikes, find_gallery, load_gallery

THUMB = 160  # thumbnail side in the explain figure and the server's /gallery answers


def open_lookalikes(
    predictor, model_dir: str | Path, gallery: str | Path | None = None, required: bool = True
) -> Lookalikes | None:
    """The gallery of a model directory (or `gallery`) with its answers; None when there is
    none and it is not `required` (a ConfigError saying how to build one otherwise)."""
    folder = Path(gallery) if gallery is not None else find_gallery(model_dir)
    if folder is None:
        if not required:
            return None
        raise ConfigError(
            f"{model_dir}: no gallery (MODEL_DIR/gallery); build one with `lookcloser gallery "
            f"build {model_dir} DATA` (DATA: the labelled images the references come from)"
        )
    if not hasattr(predictor, "method"):
        raise ConfigError(f"{model_dir}: an ensemble; look-alikes need a single model directory")
    return Lookalikes(load_gallery(folder, predictor), predictor)


class Annotator:
    """Look-alike answers of predictions, one batch at a time (`predict --neighbours /
    --reject-unknown` call it on each batch as it is predicted). Built before predicting:
    with `reject_unknown` an uncalibrated gallery is a ConfigError; `meta` (image path ->
    dict) is indexed once, not per batch."""

    def __init__(
        self,
        predictor,
        lookalikes: Lookalikes,
        k: int,
        reject_unknown: bool,
        batch_size: int = 32,
        meta: Mapping[str, Mapping] | None = None,
    ):
        if reject_unknown and not lookalikes.calibrated:
            lookalikes.open_set(np.zeros((1, 1)), np.zeros((1, 1)))  # raises, naming the fix
        self.predictor = predictor
        self.lookalikes = lookalikes
        self.k = k
        self.batch_size = batch_size
        self.meta = None if meta is None else {same_path(p): v for p, v in meta.items()}

    def __call__(
        self, predictions: Sequence, meta: Sequence[Mapping] | None = None
    ) -> list[dict[str, Any]]:
        """For each prediction (in order): its `neighbours` (k references of its top class
        and of its runner-up) and, when the gallery is calibrated, `unknown` and `open_set`.
        One embedding pass over the predicted files (the plain view); `meta`: one dict per
        prediction (else looked up in the Annotator's mapping)."""
        if not predictions:
            return []
        lookalikes, k = self.lookalikes, self.k
        files = [p.path for p in predictions]
        if meta is None and self.meta is not None:
            meta = [self.meta.get(same_path(f), {}) for f in files]
        by_path: dict[str, dict[str, Any]] = {}
        stream = EmbeddingStream(self.predictor, files, self.batch_size, 0, "skip", meta)
        top_of = {p.path: p.indices[:2] for p in predictions}
        for batch in stream:
            decisions = (
                lookalikes.open_set(batch.logits, batch.embeddings)
                if lookalikes.calibrated
                else None
            )
            for i, path in enumerate(batch.paths):
                extra: dict[str, Any] = {}
                if k > 0:
                    extra["neighbours"] = lookalikes.neighbours(
                        batch.embeddings[i], top_of[path], k
                    )
                if decisions is not None:
                    decision = decisions[i]
                    extra["unknown"] = decision["unknown"]
                    extra["open_set"] = {n: decision[n] for n in ("score", "value", "threshold")}
                by_path[path] = extra
        return [by_path.get(p.path, {}) for p in predictions]


def annotate_predictions(
    predictor,
    predictions: Sequence,
    lookalikes: Lookalikes,
    k: int,
    reject_unknown: bool,
    batch_size: int = 32,
    meta: Mapping | Sequence[Mapping] | None = None,
) -> list[dict[str, Any]]:
    """The Annotator's answers for predictions (in order); `meta`: image path -> dict, or
    one dict per prediction. With `reject_unknown` an uncalibrated gallery is a ConfigError."""
    mapping = meta if isinstance(meta, Mapping) else None
    rows = None if meta is None or mapping is not None else list(meta)
    annotator = Annotator(predictor, lookalikes, k, reject_unknown, batch_size, mapping)
    return annotator(predictions, rows)


def answer_of(prediction_dict: dict[str, Any], extra: dict[str, Any], reject: bool) -> str:
    """The answer shown: the top class, or `unknown` when rejected."""
    if reject and extra.get("unknown"):
        return "unknown"
    return prediction_dict["top"][0]["class"]


# ---- the explain figure --------------------------------------------------------------------------
def thumbnail(path: Path, max_pixels: int, side: int = THUMB) -> Image.Image:
    """A reference image as a thumbnail (a grey tile naming the problem if unreadable)."""
    from lookcloser.data.images import load_image

    try:
        image = load_image(path, max_pixels).convert("RGB")
        return ImageOps.contain(image, (side, side))  # small images grow to the tile
    except (BadImageError, OSError) as err:
        tile = Image.new("RGB", (side, side), (200, 200, 200))
        ImageDraw.Draw(tile).text((6, side // 2 - 6), f"unreadable: {err}"[:28], fill=(60, 0, 0))
        return tile


def lookalikes_figure(
    query: Image.Image,
    groups: Sequence[Mapping[str, Any]],
    gallery,
    root: str | Path | None,
    max_pixels: int,
    title: str = "",
) -> Image.Image:
    """The query beside rows of references (one row per class), each captioned with its
    class and similarity."""
    side, pad, caption = THUMB, 8, 30
    columns = max([len(g["neighbours"]) for g in groups] + [1])
    width = pad + (side + pad) * (columns + 1)
    height = pad + 20 + (side + caption + pad) * max(len(groups), 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black")
    q = ImageOps.contain(query.convert("RGB"), (side, side))
    canvas.paste(q, (pad, pad + 20))
    draw.text((pad, pad + 20 + side + 4), "query", fill="black")
    for row, group in enumerate(groups):
        y = pad + 20 + row * (side + caption + pad)
        label = "predicted" if row == 0 else "runner-up"
        for col, n in enumerate(group["neighbours"]):
            x = pad + (side + pad) * (col + 1)
            canvas.paste(thumbnail(gallery.file(n["row"], root), max_pixels), (x, y))
            draw.text((x, y + side + 2), n["class"][:26], fill="black")
            draw.text(
                (x, y + side + 14), f"{label}, similarity {n['similarity']:.3f}", fill="black"
            )
    return canvas


def write_figure(image: Image.Image, out: Path) -> Path:
    """Save a PNG atomically."""
    from lookcloser.fileio import atomic_open

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        image.save(f, format="PNG")
    return out


def explain_lookalikes(
    predictor,
    model_dir: str | Path,
    image: str | Path,
    explanation_png: str | Path,
    k: int,
    gallery: str | Path | None = None,
    root: str | Path | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Next to an explanation PNG, `<name>-lookalikes.png`: the image beside the k nearest
    references of its predicted class and of the runner-up; returns it and the answer (None
    without a gallery)."""
    lookalikes = open_lookalikes(predictor, model_dir, gallery, required=gallery is not None)
    if lookalikes is None or k < 1:
        return None
    stream = EmbeddingStream(predictor, [str(image)], 1, 0, "error", [meta or {}])
    batch = next(iter(stream))
    order = np.argsort(-batch.logits[0], kind="stable")[:2]
    answer: dict[str, Any] = {
        "neighbours": lookalikes.neighbours(batch.embeddings[0], [int(i) for i in order], k)
    }
    if lookalikes.calibrated:
        answer.update(lookalikes.open_set(batch.logits, batch.embeddings)[0])
    query = predictor.preprocess(image)
    picture = Image.fromarray((query.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))
    title = f"look-alikes of {Path(image).name}"
    if answer.get("unknown"):
        title += f" - unknown ({answer['score']} {answer['value']:.3f} < {answer['threshold']:.3f})"
    figure = lookalikes_figure(
        picture, answer["neighbours"], lookalikes.gallery, root, predictor.max_pixels, title
    )
    png = Path(explanation_png)
    return write_figure(figure, png.with_name(f"{png.stem}-lookalikes.png")), answer


# ---- the server ---------------------------------------------------------------------------------
class ServedLookalikes:
    """What `lookcloser serve` adds with a gallery: neighbours, the open-set answer and the
    references' thumbnails (read from the data root, their paths checked to stay inside)."""

    def __init__(self, lookalikes: Lookalikes):
        self.lookalikes = lookalikes
        self.gallery = lookalikes.gallery

    def answer(
        self, logits: np.ndarray, embedding: np.ndarray, top: Sequence[int], k: int
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if k > 0:
            out["neighbours"] = self.lookalikes.neighbours(embedding[0], top, k)
        if self.lookalikes.calibrated:
            decision = self.lookalikes.open_set(logits, embedding)[0]
            out["unknown"] = decision["unknown"]
            out["open_set"] = {n: decision[n] for n in ("score", "value", "threshold")}
        return out

    def thumbnail_bytes(self, row: int, root: str | None, max_pixels: int) -> bytes:
        """A reference's thumbnail as JPEG bytes; DataError when it cannot be read."""
        import io

        from lookcloser.data.images import load_image
        from lookcloser.errors import DataError, LookcloserError

        try:
            path = self.gallery.file(row, root)
            image = load_image(path, max_pixels).convert("RGB")
        except LookcloserError as err:
            raise DataError(f"gallery row {row}: {err}") from None
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def describe(self, k: int) -> dict[str, Any]:
        calibration = self.gallery.calibration
        return {
            "references": len(self.gallery),
            "neighbours": k,
            "open_set": None
            if calibration is None
            else {
                "score": calibration["score"],
                "threshold": calibration["thresholds"][calibration["score"]],
                "keep": calibration["keep"],
                "val_images": calibration.get("val_images"),
            },
        }


def serve_lookalikes(backend, gallery: str | Path | None = None) -> ServedLookalikes | None:
    """The server's look-alikes: from `gallery`, else the model directory's gallery; None
    when there is none (the server works as without)."""
    model_dir = getattr(backend, "model_dir", None)
    if gallery is None and (model_dir is None or find_gallery(model_dir) is None):
        return None
    found = open_lookalikes(backend.predictor, model_dir or ".", gallery)
    return ServedLookalikes(found)
