"""The public Python API: train(), evaluate(), load(), export(), explain().

The CLI is a thin layer over these functions; everything here is usable from a notebook.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookcloser.checks import check_config
from lookcloser.config import Config, as_config
from lookcloser.errors import ConfigError, DataError
from lookcloser.modeldir import trusting_modules
from lookcloser.predictor import PredictionStream, Predictor
from lookcloser.scoring import (
    check_same_classes,
    outputs_on_test,  # noqa: F401  (public: api.outputs_on_test, whole arrays)
    split_stream,
    stream_on_test,
)
from lookcloser.training import TrainResult

log = logging.getLogger(__name__)

__all__ = [
    "TrainResult",
    "train",
    "load",
    "evaluate",
    "predict",
    "predict_stream",
    "explain",
    "export",
    "serve",
    "export_int8",
    "compare",
    "fit_ensemble",
    "set_tta_default",
    "ood_report",
    "trusting_modules",
    "Predictor",
    "Config",
]


def train(
    config: Config | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    callbacks: list | None = None,
) -> TrainResult | None:
    """Train a method, evaluate it on the val and test splits and write a model directory.

    Nothing is written until the config, the data and the model have passed their checks; a
    run that fails before its first checkpoint leaves no directory behind (and an overwritten
    run is put back). `semi.strategy=cluster_pretrain` runs its stages and rounds, each an
    ordinary training in a sub-run. `callbacks` are extra Lightning callbacks. Returns None
    in DDP processes other than rank 0.
    """
    cfg = check_config(as_config(config, overrides))
    if cfg.semi.strategy == "cluster_pretrain":
        from lookcloser.cluster_pretrain import run_cluster_pretrain

        return run_cluster_pretrain(cfg, progress=progress, callbacks=callbacks)
    from lookcloser import training

    return training.train(cfg, progress=progress, callbacks=callbacks)


def load(
    model_dir: str | Path,
    device: str = "cpu",
    tta: str | None = None,
    *,
    trust_modules: list[str] | tuple[str, ...] = (),
) -> Predictor:
    """Load a model directory as a Predictor, or an ensemble directory as an
    EnsemblePredictor (the same interface). `tta`: test-time augmentation, e.g.
    "flip,five_crop,scales=224+288" (None: the directory's default; "none": off).

    A model directory never makes lookcloser import code: `trust_modules` names the modules
    its `config.method.module` may import (a method defined outside lookcloser and its entry
    points), as `--trust-module` does; `with trusting_modules([...]):` does the same for
    every call inside it (evaluate, predict, explain, export, serve, compare, fit_ensemble).
    """
    from lookcloser.loader import load_model

    return load_model(model_dir, device, tta, trust_modules)


def set_tta_default(model_dir: str | Path, spec: str | None) -> str:
    """Store a test-time augmentation spec as a model's (or ensemble's) default, used by
    predict / eval / serve unless they name another; "none" removes it. Returns the spec."""
    from lookcloser.loader import set_default_tta

    return set_default_tta(model_dir, spec).get("tta", "none")


def evaluate(
    model_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    write_to: str | Path | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Metrics of a saved model or ensemble on its test split (or on data.* overrides);
    `tta` as for `load`."""
    from lookcloser.evaluation import stream_metrics, summary, write_confusion

    predictor, stream = stream_on_test(
        model_dir, overrides, progress=progress, device=device, tta=tta
    )
    metrics = stream_metrics(stream, predictor.classes, "test")
    if write_to is not None:
        write_confusion(metrics["confusion_counts"], predictor.classes, write_to)
    return {**summary(metrics), "most_confused": metrics["most_confused"]}


def predict(
    model_dir: str | Path,
    paths: list[str | Path],
    top_k: int = 5,
    batch_size: int = 32,
    on_bad_image: str = "error",
    meta: str | Path | dict | list | None = None,
    tta: str | None = None,
    boxes: str | Path | dict | None = None,
) -> list:
    """Top-k predictions for files and folders (`on_bad_image="skip"`: see `.skipped`).

    `meta`: per-image metadata for models that take it: a CSV / JSON file (see
    `data.meta.read_meta_file`), a mapping of path -> dict, or one dict per image.
    `tta`: test-time augmentation, as for `load`.
    `boxes`: object boxes for crop-fusion models: a JSON box file (`data.boxes`: image path
    -> [x, y, w, h] in original pixels) or such a mapping; left out, the model's attention
    chooses the crops (images without a box: see `.without_box`).
    """
    stream = predict_stream(model_dir, paths, top_k, batch_size, on_bad_image, meta, tta, boxes)
    return stream.collect()


def predict_stream(
    model_dir: str | Path,
    paths: list[str | Path],
    top_k: int = 5,
    batch_size: int = 32,
    on_bad_image: str = "error",
    meta: str | Path | dict | list | None = None,
    tta: str | None = None,
    boxes: str | Path | dict | None = None,
) -> PredictionStream:
    """`predict` batch by batch (arguments as for `predict`): a PredictionStream to iterate
    once, yielding each batch's list of Predictions as it is predicted, so memory stays flat
    in the number of images. Files, metadata and boxes are checked before the first batch;
    `.skipped` grows as bad files are met. With on_bad_image="error" the batches before the
    first bad file are yielded, then a BadImagesError names every bad file."""
    if isinstance(boxes, str | Path):
        from lookcloser.data.boxes import read_box_file

        boxes = read_box_file(boxes)
    predictor = load(model_dir, tta=tta)
    if boxes is not None and not getattr(predictor, "crop_fusion", False):
        raise ConfigError(f"boxes: {model_dir} has no crop fusion (model.crop_fusion=none)")
    return predictor.predict_stream(
        paths,
        top_k=top_k,
        batch_size=batch_size,
        on_bad_image=on_bad_image,
        meta=_meta_argument(meta),
        **({"boxes": boxes} if boxes is not None else {}),
    )


def _meta_argument(meta):
    # A file path is read here; mappings and lists go to the Predictor as they are.
    if isinstance(meta, str | Path):
        from lookcloser.data.meta import read_meta_file

        return read_meta_file(meta)
    return meta


def explain(
    model_dir: str | Path,
    image: str | Path,
    out: str | Path | None = None,
    target: str | None = None,
    map_name: str | None = None,
    meta: str | Path | dict | None = None,
    part: int | None = None,
) -> Path | list[Path]:
    """Write the image and its attention heatmap side by side as a PNG; returns its path
    (for an ensemble, one PNG per member, `<name>-<member>.png`, all explaining the class
    the ensemble predicts unless `target` names one; returns their paths).

    `out` defaults to `MODEL_DIR/explanations/<image name>.png`, or
    `<image name>-<8 hex digits>.png` (a hash of the image's resolved path) when that file
    already explains another image with the same name.
    `meta`: the image's metadata dict, or a CSV / JSON metadata file to look the image up in.
    `part`: show part map K and the image it samples (methods with part maps: TASN).
    """
    from lookcloser.data.meta import same_path
    from lookcloser.explain.overlay import (
        INPUT_KEY,
        default_explanation_path,
        explained_input,
        save_explanation,
    )
    from lookcloser.fileio import WriteError, safe_name

    if isinstance(meta, str | Path):
        meta = _meta_argument(meta).get(same_path(image), {})
    predictor = load(model_dir)
    name = Path(image).stem + (f"-part{part}" if part is not None else "")
    folder = Path(model_dir) / "explanations"
    if not out and folder.is_symlink():
        # The model directory is not the user's choice of output folder: a link in it could
        # point anywhere, so the default folder must be a real one.
        raise WriteError(
            f"{folder}: is a link ({os.readlink(folder)}); explain writes its default output "
            "only into a real folder: remove the link or choose the file with --out"
        )
    # The PNG records its input, so a default name taken by another image's picture (a/x.png,
    # then b/x.png) gets a stable hash suffix instead of overwriting it.
    record = {INPUT_KEY: explained_input(image)}

    def target_file(member: str | None = None) -> Path:
        # A member name from ensemble.json is data: never a path separator or `..`.
        tail = f"-{safe_name(member)}" if member is not None else ""
        if out and tail:
            return Path(out).with_name(f"{Path(out).stem}{tail}{Path(out).suffix or '.png'}")
        return Path(out) if out else default_explanation_path(folder, image, name + tail)

    if not isinstance(predictor, Predictor):  # an ensemble: one picture per member
        return [
            save_explanation(explanation, target_file(member), map_name=map_name, metadata=record)
            for member, explanation in predictor.explain(image, target, map_name, meta, part)
        ]
    explanation = predictor.explain(image, target, map_name, meta, part)
    return save_explanation(explanation, target_file(), map_name=map_name, metadata=record)


def export(
    model_dir: str | Path, format: str = "onnx", out: str | Path | None = None
) -> tuple[Path, float]:
    """Export to ONNX and check it: returns the file and the max |logit| difference to PyTorch."""
    from lookcloser.export.onnx import export_onnx, max_abs_difference

    if format != "onnx":
        raise ConfigError(f"export --format: only 'onnx' is supported, got {format!r}")
    predictor = load(model_dir, tta="none")
    if not isinstance(predictor, Predictor):
        return _export_ensemble(predictor, Path(out) if out else Path(model_dir) / "onnx")
    out = Path(out) if out else Path(model_dir) / "model.onnx"
    export_onnx(predictor, out)
    return out, max_abs_difference(predictor, out)


def serve(
    model_dir: str | Path,
    settings=None,
    backend: str = "torch",
    onnx_file: str | Path | None = None,
    device: str = "cpu",
) -> None:
    """Serve a model over HTTP until interrupted: the REST API and the web page
    (`lookcloser.serve.app.ServeSettings`: host, port, token, batching, limits)."""
    from lookcloser.serve.app import ServeSettings, run
    from lookcloser.serve.backends import load_backend

    settings = (settings or ServeSettings()).check()
    run(load_backend(model_dir, backend, onnx_file, device), settings)


def export_int8(
    model_dir: str | Path,
    out: str | Path | None = None,
    *,
    calibration: str | Path | None = None,
    calibration_images: int = 64,
    check_images: int = 256,
    quant_format: str = "qdq",
    per_channel: bool = True,
    exclude_ends: bool = True,
):
    """int8 ONNX (ONNX Runtime static quantization) calibrated on training images (or the
    images under `calibration`), checked against fp32 on other images; returns a
    `QuantizeResult` (file, JSON sidecar, top-1 agreement with fp32)."""
    from lookcloser.export.quantize import QuantizeSettings, quantize_int8

    settings = QuantizeSettings(
        quant_format=quant_format,
        per_channel=per_channel,
        exclude_ends=exclude_ends,
        calibration_images=calibration_images,
        check_images=check_images,
    ).validate()
    predictor = load(model_dir)
    if not isinstance(predictor, Predictor):
        raise ConfigError(
            f"{model_dir}: an ensemble directory; int8 export takes one model directory "
            "(quantize each member's directory)"
        )
    out = Path(out) if out else Path(model_dir) / "model.int8.onnx"
    return quantize_int8(predictor, out, calibration, settings)


def compare(
    run_dirs: list[str | Path] | tuple = (),
    out: str | Path = "compare-report",
    *,
    methods: list[str] | tuple = (),
    seeds: list[int] | tuple = (0,),
    data: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    runs_dir: str | Path | None = None,
    images: int = 6,
    classes_shown: int = 10,
    cost_batch: int = 8,
    cost_rounds: int = 3,
    progress: bool = True,
    device: str = "cpu",
):
    """A report comparing trained runs (HTML, Markdown, CSV in `out`); returns a CompareReport.

    With `methods`, each method x seed is first trained through `train` into
    `runs_dir/<method>-s<seed>` (default `out/runs`), from `config` + `overrides` (`data`: an
    ImageFolder root, or data.root for the source the config names); runs already there
    with the same config are kept.
    """
    from lookcloser.compare import build_report, prepare_out, read_run, train_missing

    if not methods and (data is not None or config is not None or overrides):
        raise ConfigError(
            "compare: --data, --config and key=value overrides say how to train; they need --methods"
        )
    for path in run_dirs:
        read_run(path)  # a bad folder fails now, not after the training
    trained = []
    if methods:
        prepare_out(Path(out))
        trained = train_missing(
            train,
            methods,
            seeds,
            Path(runs_dir) if runs_dir else Path(out) / "runs",
            config,
            overrides or [],
            data,
            progress,
        )
    # Runs trained here from the user's own config may load the module that config names.
    own = as_config(config, list(overrides or [])).method.get("module") if methods else None
    with trusting_modules([own] if own else []):
        return build_report(
            [*run_dirs, *trained],
            out,
            images=images,
            classes_shown=classes_shown,
            cost_batch=cost_batch,
            cost_rounds=cost_rounds,
            progress=progress,
            device=device,
        )


def _export_ensemble(ensemble, out: Path) -> tuple[Path, float]:
    """One ONNX graph per member in folder `out`, and onnx.json: files, weights, preprocessing
    and how to combine (the weighted mean of each graph's softmax)."""
    from lookcloser.export.onnx import export_onnx, max_abs_difference
    from lookcloser.fileio import atomic_write_text, safe_name

    out.mkdir(parents=True, exist_ok=True)
    worst, members, used = 0.0, [], set()
    for i, (name, member, weight) in enumerate(
        zip(ensemble.names, ensemble.members, ensemble.weights, strict=True)
    ):
        # Member names are ensemble.json's data: one file name each, inside `out`.
        file = safe_name(name)
        file = file if file not in used else f"{file}-{i}"
        used.add(file)
        path = export_onnx(member, out / f"{file}.onnx")
        worst = max(worst, max_abs_difference(member, path))
        members.append(
            {
                "file": path.name,
                "weight": weight,
                "inputs": ["images", "meta", "meta_mask"] if member.meta_keys else ["images"],
                "meta_keys": member.meta_keys,
                "preprocessing": member.info.get("preprocessing", {}),
            }
        )
    record = {
        "combine": "probabilities = sum of weight x softmax(logits) over the members",
        "classes": ensemble.classes,
        "members": members,
    }
    atomic_write_text(out / "onnx.json", json.dumps(record, indent=2) + "\n")
    return out, worst


@dataclass
class EnsembleResult:
    """What `fit_ensemble` wrote: the directory, the weights and the validation scores."""

    path: Path
    weights: list[float]
    validation: dict[str, Any]


def fit_ensemble(
    model_dirs: list[str | Path],
    out: str | Path,
    overrides: list[str] | None = None,
    *,
    seed: int = 0,
    maxiter: int = 200,
    tta: str | None = None,
    weights: str = "fitted",
    progress: bool = True,
    device: str = "cpu",
) -> EnsembleResult:
    """Fit member weights on the validation split and write an ensemble directory.

    The validation split is the one the members were trained beside (their saved config:
    the source's val split, else data.val_fraction carved with data.split_seed); every member
    must name the same one, and the test split is never read. `overrides` (data.* only)
    point at another labelled set's val split. `tta`: fit (and later predict) with
    test-time augmentation. `weights="equal"` predicts with equal weights (the fitted ones
    are still searched and recorded): fitted weights overfit a small validation split.
    """
    from dataclasses import replace as replace_dc

    from lookcloser.data.prepare import prepare_data
    from lookcloser.ensemble import fit_weights, write_ensemble_dir
    from lookcloser.predictor import Predictor as Single
    from lookcloser.records import RunRecord

    if not model_dirs:
        raise ConfigError("ensemble fit: no model directories")
    for item in overrides or []:
        if not item.startswith("data.") or item.startswith("data.meta_keys="):
            raise ConfigError(
                f"ensemble fit takes data.* overrides only (not meta_keys), got {item!r}"
            )
        if item.split("=", 1)[0] in ("data.val_fraction", "data.split_seed"):
            raise ConfigError(
                f"ensemble fit: {item.split('=', 1)[0]} cannot be overridden: another carve of "
                "the members' training images would fit weights on images they learned from; "
                "point data.root at a labelled set with a val/ folder instead"
            )
    members = [Single.load(d, device, tta=tta or "none") for d in model_dirs]
    configs = [Config.from_dict(m.info["config"]).apply_overrides(overrides or []) for m in members]
    split_keys = (
        "source",
        "root",
        "val_fraction",
        "split_seed",
        "test_fraction",
        "level",
        "train_split",
    )
    split = {k: getattr(configs[0].data, k) for k in split_keys}
    for d, cfg in zip(model_dirs, configs, strict=True):
        other = {k: getattr(cfg.data, k) for k in split_keys}
        if other != split or cfg.data.synthetic != configs[0].data.synthetic:
            differ = [f"data.{k}" for k in split_keys if other[k] != split[k]] or ["data.synthetic"]
            raise ConfigError(
                f"ensemble fit: {d} was validated on another split than {model_dirs[0]} "
                f"({', '.join(differ)} differ); members must share one validation split"
            )
    cfg = configs[0]
    data = prepare_data(replace_dc(cfg.data, unlabelled=None))
    for m in members:
        check_same_classes(data.classes, m.classes)
    # One streamed pass per member, kept as a RunRecord (top-K classes per image and the
    # label's probability): never M x N x C probabilities.
    streams = [split_stream(m, cfg, progress, "val", data.index, data.val) for m in members]
    records = [
        None if s is None else RunRecord.from_stream(s, len(m.classes))
        for s, m in zip(streams, members, strict=True)
    ]
    if records[0] is None or records[0].images == 0:
        raise DataError(
            f"ensemble fit: no validation split (data.root={cfg.data.root}, "
            f"data.val_fraction={cfg.data.val_fraction}): weights must be fitted on images the "
            "members did not train on; train the members with data.val_fraction > 0, or pass "
            "data.root=<a labelled set with a val/ folder>"
        )
    fit = fit_weights(records, seed=seed, maxiter=maxiter)
    info = {
        "classes": members[0].classes,
        "validation": {"split": split, "val_split": data.val_split},
        **({"tta": members[0].tta.spec()} if members[0].tta else {}),
    }
    path = write_ensemble_dir(out, model_dirs, fit, info, use=weights)
    validation = {
        "images": fit.images,
        "fitted": fit.fitted_score,
        "equal": fit.equal_score,
        "members": fit.member_scores,
    }
    chosen = fit.weights if weights == "fitted" else fit.equal_weights
    return EnsembleResult(path, chosen, validation)


def ood_report(run_dir: str | Path, per_row: int = 6, groups: int = 8) -> list[dict[str, Any]]:
    """What each semi-supervised stage of a run kept and why; writes a picture per stage
    (RUN_DIR/semi/report-<stage>.png) and returns each stage's summary."""
    from lookcloser.semi.report import ood_report as report

    return report(run_dir, per_row=per_row, groups=groups)


# ---- look-alikes (issue 26): embeddings, galleries, enrollment; lookcloser/lookalikes/ -----------
def embed(
    model_dir: str | Path,
    paths: list[str | Path],
    out: str | Path,
    *,
    batch_size: int = 32,
    on_bad_image: str = "error",
    meta: str | Path | dict | list | None = None,
    device: str = "cpu",
):
    """Write the L2-normalised embedding of every image (the feature the class decision
    reads) with its path, predicted class and score to `out`: `.parquet`, or `.npy` with a
    `.csv` beside it; streamed batch by batch. Returns `lookalikes.embed.EmbeddingsWritten`."""
    from lookcloser.lookalikes.embed import check_output, write_embeddings

    check_output(out)
    predictor = load(model_dir, device, tta="none")
    if not isinstance(predictor, Predictor):
        raise ConfigError(f"{model_dir}: an ensemble; embeddings need a single model directory")
    if isinstance(meta, str | Path):
        from lookcloser.data.meta import read_meta_file

        meta = read_meta_file(meta)
    stream = predictor.embed(paths, batch_size, on_bad_image=on_bad_image, meta=meta)
    return write_embeddings(stream, out, predictor.classes)


def build_gallery(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    batch_size: int = 32,
    on_bad_image: str = "error",
    keep: float = 0.95,
    device: str = "cpu",
):
    """Embed the labelled training images of `data` into a gallery (default
    MODEL_DIR/gallery) and calibrate the open-set threshold on its validation split. Returns
    `lookalikes.gallery.GalleryBuilt`."""
    from lookcloser.lookalikes.gallery import GALLERY_DIR
    from lookcloser.lookalikes.gallery import build_gallery as build

    predictor = load(model_dir, device, tta="none")
    if not isinstance(predictor, Predictor):
        raise ConfigError(f"{model_dir}: an ensemble; a gallery needs a single model directory")
    out = Path(out) if out else Path(model_dir) / GALLERY_DIR
    return build(predictor, data, out, batch_size, 0, on_bad_image, keep)


def enroll(
    model_dir: str | Path,
    classes: dict[str, list[str | Path]] | None,
    out: str | Path,
    *,
    folder: str | Path | None = None,
    batch_size: int = 32,
    on_bad_image: str = "error",
    gallery: bool = True,
):
    """Write a new model directory `out`: the model of `model_dir` with new classes
    ({name: image files or folders}, and/or `folder`'s class folders) enrolled from their
    mean embeddings, without retraining; MODEL_DIR's gallery, if any, is carried over with
    the new images as references (`gallery=False`: not). Returns
    `lookalikes.enroll.EnrollResult`."""
    from lookcloser.lookalikes.enroll import class_folders
    from lookcloser.lookalikes.enroll import enroll as add_classes

    new = dict(classes or {})
    for name, images in (class_folders(folder) if folder else {}).items():
        if name in new:
            raise ConfigError(f"--class {name!r}: also a class folder of {folder}")
        new[name] = images
    return add_classes(model_dir, new, out, batch_size, on_bad_image, gallery)
