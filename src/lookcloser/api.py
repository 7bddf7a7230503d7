"""The public Python API: train(), evaluate(), load(), export(), explain().

The CLI is a thin layer over these functions; everything here is usable from a notebook.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lookcloser.config import Config
from lookcloser.data.prepare import SHARDS
from lookcloser.data.sources import build_source
from lookcloser.errors import ConfigError, DataError
from lookcloser.predictor import Predictor
from lookcloser.tta import TTA

__all__ = [
    "TrainResult",
    "train",
    "load",
    "evaluate",
    "predict",
    "explain",
    "export",
    "serve",
    "export_int8",
    "compare",
    "fit_ensemble",
    "set_tta_default",
    "ood_report",
    "Predictor",
    "Config",
]


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    metrics: dict[str, Any]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def as_config(
    config: Config | str | Path | dict | None = None, overrides: list[str] | None = None
) -> Config:
    """A Config from a Config, a YAML path or a dict, with `key=value` overrides applied."""
    if isinstance(config, Config):
        cfg = Config.from_dict(config.to_dict())
        return cfg.apply_overrides(overrides or [])
    if isinstance(config, dict):
        return Config.from_dict(config).apply_overrides(overrides or [])
    return Config.load(config, overrides)


def _global_rank() -> int:
    """This process's rank when launched by Lightning's DDP launcher or torchrun (else 0)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", 0))
    return node * 1000 + local  # only "is it zero" matters here


def _run_dir(cfg: Config, rank_zero: bool) -> Path:
    # DDP children re-run the command; they must use the directory rank 0 chose.
    if not rank_zero and os.environ.get("LOOKCLOSER_RUN_DIR"):
        return Path(os.environ["LOOKCLOSER_RUN_DIR"])
    if cfg.out:
        return Path(cfg.out).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backbone = cfg.model.backbone.replace("/", "_")
    return Path("runs") / f"{stamp}-{cfg.method.get('name', 'baseline')}-{backbone}"


def _resume_path(cfg: Config, run_dir: Path) -> str | None:
    resume = cfg.trainer.resume
    if resume is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise ConfigError(f"trainer.resume: checkpoint not found: {path}")
    return str(path)


def check_config(cfg: Config) -> Config:
    """Every range, the method's options and the declared metadata, checked before any data
    or model is touched."""
    from lookcloser.config import method_options
    from lookcloser.data.boxes import check_box_config
    from lookcloser.data.meta import check_meta_keys
    from lookcloser.methods.base import check_crop_use, check_meta_use, method_class
    from lookcloser.models.heads import HeadSpec
    from lookcloser.semi import check_semi

    cfg.validate()
    check_semi(cfg)
    try:
        tta = TTA.parse(cfg.model.tta)
    except ConfigError as e:
        raise ConfigError(f"model.tta={cfg.model.tta!r}: {e}") from None
    if tta is not None and cfg.model.crop_fusion != "none" and cfg.data.test_boxes != "attention":
        # Found now, not in the report after training: the crops' views are not made.
        raise ConfigError(
            f"model.tta={cfg.model.tta!r} with data.test_boxes={cfg.data.test_boxes!r}: "
            "test-time augmentation takes crops from the model's attention only "
            "(data.test_boxes=attention) or no TTA (model.tta=none)"
        )
    cls = method_class(cfg.method.get("name", "baseline"), cfg.method.get("module"))
    method_options(cfg, cls.Options)
    keys = check_meta_keys(cfg.data.meta_keys)
    check_meta_use(cls.name, cls.accepts_meta, HeadSpec.from_config(cfg.model), keys)
    check_crop_use(cls.name, cls.supports_crop_fusion, HeadSpec.from_config(cfg.model))
    check_box_config(cfg)
    return cfg


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
    run is put back). `callbacks` are extra Lightning callbacks. Returns None in DDP
    processes other than rank 0.
    """
    from lookcloser.rundir import RunDir

    cfg = check_config(as_config(config, overrides))
    if cfg.semi.strategy == "cluster_pretrain":
        # Stages (embed, cluster, pretrain, fine-tune) in sub-runs, each a train() of its own.
        from lookcloser.semi.pipeline import run_cluster_pretrain

        return run_cluster_pretrain(cfg, progress=progress, callbacks=callbacks)
    rank_zero = _global_rank() == 0
    run_dir = _run_dir(cfg, rank_zero)
    # DDP children re-run the command; only rank 0 owns the directory.
    plan = (
        RunDir.plan(run_dir, resume=cfg.trainer.resume, overwrite=cfg.overwrite)
        if rank_zero
        else None
    )
    previous = os.environ.get("LOOKCLOSER_RUN_DIR")
    os.environ["LOOKCLOSER_RUN_DIR"] = str(run_dir.resolve())  # inherited by DDP children
    try:
        return _train(cfg, run_dir, plan, progress, callbacks)
    except BaseException:
        if plan is not None:
            plan.abandon()
        raise
    finally:
        if previous is None:
            os.environ.pop("LOOKCLOSER_RUN_DIR", None)
        else:
            os.environ["LOOKCLOSER_RUN_DIR"] = previous


def _train(
    cfg: Config, run_dir: Path, plan, progress: bool, callbacks: list | None
) -> TrainResult | None:
    import lightning as L
    import torch

    from lookcloser.data.prepare import prepare_data
    from lookcloser.data.transforms import eval_transform, train_transform
    from lookcloser.engine.datamodule import build_datamodule
    from lookcloser.engine.module import FGVCSystem
    from lookcloser.engine.trainer import build_trainer
    from lookcloser.methods import build_method
    from lookcloser.semi import build_objective, check_validation, unlabelled_transform

    ckpt_path = _resume_path(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Shards: classes and counts from the index; bad images are handled while decoding
    # (data.on_bad_image), as no up-front pass over millions of files is made.
    data = prepare_data(cfg.data)
    check_validation(cfg, data.count("val"))
    method = build_method(cfg, len(data.classes))
    interpolation = method.backbone.data_config.get("interpolation", "bicubic")
    # A method may take larger images than data.image_size and sample its views from them.
    input_size = method.input_size or cfg.data.image_size
    datamodule = build_datamodule(
        cfg,
        data,
        train_transform(replace(cfg.data, image_size=input_size), interpolation),
        eval_transform(input_size, cfg.data.crop_pct, interpolation),
        unlabelled_transform(cfg, input_size, interpolation),
    )
    trainer = build_trainer(
        cfg,
        run_dir,
        progress,
        has_val=data.count("val") > 0,
        callbacks=callbacks,
        on_checkpoint=(lambda _: plan.checkpoint_saved()) if plan is not None else None,
    )
    if data.index is not None:
        # A ShardDataset rank yields whole batches only (no short last batch).
        num_train = data.count("train")
        if num_train // trainer.world_size // cfg.data.batch_size == 0:
            raise DataError(
                f"data.batch_size={cfg.data.batch_size}: the shards hold {num_train} training "
                f"samples for {trainer.world_size} process(es), less than one whole batch each"
            )
    system = FGVCSystem(
        method,
        cfg.optim,
        epochs=cfg.trainer.epochs,
        seed=cfg.seed,
        mixup=cfg.data.mixup,
        cutmix=cfg.data.cutmix,
        ema_decay=cfg.trainer.ema_decay,
        freeze_norm=cfg.model.freeze_norm,
        semi=build_objective(cfg, method),
    )
    if plan is not None:
        plan.claim(cfg.to_yaml(), data.skipped)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        # Short epochs still log epoch means; and mid-epoch resume is exact through the
        # EpochSampler position saved by FGVCSystem, which Lightning cannot see.
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # ShardDataset's length is exact: every worker yields its own quota of whole batches.
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return None

    trained = system.ema.module if system.ema is not None else system.method
    inference = trained.for_inference().cpu().eval()
    predictor = Predictor(
        inference,
        data.classes,
        input_size,
        cfg.data.crop_pct,
        interpolation,
        device="cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu",
        max_pixels=cfg.data.max_image_pixels,
    )
    predictor.tta = cfg.model.tta
    metrics = _evaluate_and_write(predictor, cfg, data, run_dir, progress)
    if system.semi is not None:
        from lookcloser.semi import write_online_records

        write_online_records(
            run_dir,
            system.semi,
            inference,
            cfg,
            data,
            predictor.transform,
            progress,
            predictor.device,
        )
    training = {
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
    }
    _save(run_dir, inference, data, cfg, metrics, interpolation, training, predictor.tta)
    return TrainResult(run_dir, metrics, data.classes, data.skipped)


def _evaluate_and_write(
    predictor: Predictor, cfg: Config, data, run_dir: Path, progress: bool
) -> dict[str, Any]:
    """metrics.json: the final model on the val split and on the test split (read only now)."""
    from lookcloser.evaluation import compute_metrics, summary, write_confusion
    from lookcloser.modeldir import atomic_write_text

    full = {}
    for split in ("val", "test"):
        out = _split_outputs(predictor, cfg, progress, split, data.index, getattr(data, split))
        if out is None:
            continue
        metrics = compute_metrics(out.logits, out.labels, predictor.classes)
        full[split] = {**summary(metrics), "most_confused": metrics["most_confused"]}
        if predictor.tta is not None:
            full[split]["tta"] = predictor.tta.spec()
        if split == "test":
            write_confusion(metrics["confusion"], predictor.classes, run_dir)
    atomic_write_text(run_dir / "metrics.json", json.dumps(full, indent=2) + "\n")
    return full


def _split_outputs(predictor: Predictor, cfg: Config, progress: bool, split: str, index, samples):
    """The Predictor's logits over one split of a source or of shards (None if empty); for an
    ensemble, the log of its members' mixture."""
    from lookcloser.ensemble import EnsemblePredictor

    if isinstance(predictor, EnsemblePredictor):
        outputs = [
            _split_outputs(member, cfg, progress, split, index, samples)
            for member in predictor.members
        ]
        return None if outputs[0] is None else predictor.combine_outputs(outputs)
    if index is None:
        if not samples:
            return None
        from lookcloser.engine.datamodule import split_boxes

        return predictor.run_samples(
            samples,
            cfg.data.batch_size,
            cfg.data.num_workers,
            progress,
            f"evaluate {split}",
            boxes=split_boxes(cfg, samples, split),
        )
    if not index.urls.get(split):
        return None
    from torch.utils.data import DataLoader

    from lookcloser.data.batch import collate
    from lookcloser.data.shards import ShardDataset

    # The same decoded images and eval transform as the folder path, so the same logits.
    dataset = ShardDataset.from_index(
        index,
        split,
        transform=predictor.item_transform,
        meta_keys=predictor.meta_keys,
        max_pixels=predictor.max_pixels,
        on_bad_image=cfg.data.on_bad_image,
        rank=0,
        world_size=1,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
    )
    return predictor.run_batches(loader, progress, f"evaluate {split}")


def _save(
    run_dir: Path,
    inference,
    data,
    cfg: Config,
    metrics: dict,
    interpolation: str,
    training: dict | None = None,
    tta: TTA | None = None,
) -> None:
    from lookcloser.evaluation import summary
    from lookcloser.modeldir import save_model_dir

    classes = data.classes
    options = asdict(inference.options) if inference.options is not None else {}
    info = {
        "method": inference.name,
        "method_options": options,
        "trained_with": cfg.method.get("name", "baseline"),
        "backbone": cfg.model.backbone,
        "num_classes": len(classes),
        "classes": classes,
        "preprocessing": {
            "input": "RGB, float32 in [0, 1], N x 3 x H x W (normalization is inside the model)",
            "image_size": inference.input_size or cfg.data.image_size,
            "crop_pct": cfg.data.crop_pct,
            "interpolation": interpolation,
            "mean": inference.backbone.mean.flatten().tolist(),
            "std": inference.backbone.std.flatten().tolist(),
        },
        # The metadata inputs, in the order of the `meta` / `meta_mask` columns.
        "meta_keys": list(inference.meta_keys),
        "data": {"source": cfg.data.source, "root": cfg.data.root, **data.summary()},
        "metrics": {split: summary(values) for split, values in metrics.items()},
        "training": training or {},
        "config": cfg.to_dict(),
    }
    if tta is not None:  # the model's default, as `lookcloser tta-default` records it
        info["tta"] = tta.spec()
    save_model_dir(run_dir, inference.state_dict(), info)


def load(model_dir: str | Path, device: str = "cpu", tta: str | None = None) -> Predictor:
    """Load a model directory as a Predictor, or an ensemble directory as an
    EnsemblePredictor (the same interface). `tta`: test-time augmentation, e.g.
    "flip,five_crop,scales=224+288" (None: the directory's default; "none": off)."""
    from lookcloser.predictor import load_model

    return load_model(model_dir, device, tta)


def set_tta_default(model_dir: str | Path, spec: str | None) -> str:
    """Store a test-time augmentation spec as a model's (or ensemble's) default, used by
    predict / eval / serve unless they name another; "none" removes it. Returns the spec."""
    from lookcloser.modeldir import set_default_tta

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
    from lookcloser.evaluation import compute_metrics, summary, write_confusion

    predictor, out = outputs_on_test(
        model_dir, overrides, progress=progress, device=device, tta=tta
    )
    metrics = compute_metrics(out.logits, out.labels, predictor.classes)
    if write_to is not None:
        write_confusion(metrics["confusion"], predictor.classes, write_to)
    return {**summary(metrics), "most_confused": metrics["most_confused"]}


def outputs_on_test(
    model_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    tta: str | None = None,
):
    """The loaded Predictor (or EnsemblePredictor) and its logits, labels and image paths on
    the model's test split (or on data.* overrides); paths are empty for shards."""
    from lookcloser.data.prepare import verified

    predictor = load(model_dir, device, tta)
    cfg = Config.from_dict(predictor.info["config"])
    for item in overrides or []:
        if not item.startswith("data."):
            raise ConfigError(f"eval takes data.* overrides only, got {item!r}")
        if item.startswith("data.meta_keys="):
            raise ConfigError("eval: data.meta_keys is the model's own; it cannot be overridden")
    cfg.apply_overrides(overrides or [])
    predictor.max_pixels = cfg.data.max_image_pixels  # an override applies to evaluation too
    test, index = [], None
    if cfg.data.source == SHARDS:
        from lookcloser.data.shards import open_shards

        index = open_shards(cfg.data.root)
        _check_same_classes(index.classes, predictor.classes)
    else:
        splits = build_source(cfg.data)
        _check_same_classes(splits.classes, predictor.classes)
        test = verified(splits.replace_samples([], splits.test, []), cfg.data)[0].test
    out = _split_outputs(predictor, cfg, progress, "test", index, test)
    if out is None:
        raise DataError(f"data.root={cfg.data.root}: no test split to evaluate")
    return predictor, out


def _check_same_classes(data_classes: list[str], model_classes: list[str]) -> None:
    from lookcloser.errors import DataError

    if data_classes != model_classes:
        missing = sorted(set(data_classes) - set(model_classes))
        raise DataError(
            "the data's classes differ from the model's"
            + (f" (not in the model: {', '.join(missing[:5])})" if missing else " (order or names)")
        )


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
    if isinstance(boxes, str | Path):
        from lookcloser.data.boxes import read_box_file

        boxes = read_box_file(boxes)
    predictor = load(model_dir, tta=tta)
    if boxes is not None and not getattr(predictor, "crop_fusion", False):
        raise ConfigError(f"boxes: {model_dir} has no crop fusion (model.crop_fusion=none)")
    return predictor.predict(
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

    `meta`: the image's metadata dict, or a CSV / JSON metadata file to look the image up in.
    `part`: show part map K and the image it samples (methods with part maps: TASN).
    """
    from lookcloser.data.meta import same_path
    from lookcloser.explain.overlay import save_explanation

    if isinstance(meta, str | Path):
        meta = _meta_argument(meta).get(same_path(image), {})
    predictor = load(model_dir)
    name = Path(image).stem + (f"-part{part}" if part is not None else "")
    out = Path(out) if out else Path(model_dir) / "explanations" / f"{name}.png"
    if not isinstance(predictor, Predictor):  # an ensemble: one picture per member
        return [
            save_explanation(
                explanation,
                out.with_name(f"{out.stem}-{member}{out.suffix or '.png'}"),
                map_name=map_name,
            )
            for member, explanation in predictor.explain(image, target, map_name, meta, part)
        ]
    explanation = predictor.explain(image, target, map_name, meta, part)
    return save_explanation(explanation, out, map_name=map_name)


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
            methods,
            seeds,
            Path(runs_dir) if runs_dir else Path(out) / "runs",
            config,
            overrides or [],
            data,
            progress,
        )
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
    from lookcloser.modeldir import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    worst, members = 0.0, []
    for name, member, weight in zip(
        ensemble.names, ensemble.members, ensemble.weights, strict=True
    ):
        path = export_onnx(member, out / f"{name}.onnx")
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
        _check_same_classes(data.classes, m.classes)
    outputs = [_split_outputs(m, cfg, progress, "val", data.index, data.val) for m in members]
    if outputs[0] is None or len(outputs[0].labels) == 0:
        raise DataError(
            f"ensemble fit: no validation split (data.root={cfg.data.root}, "
            f"data.val_fraction={cfg.data.val_fraction}): weights must be fitted on images the "
            "members did not train on; train the members with data.val_fraction > 0, or pass "
            "data.root=<a labelled set with a val/ folder>"
        )
    fit = fit_weights(
        [o.logits.float().softmax(dim=1) for o in outputs], outputs[0].labels, seed, maxiter
    )
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
