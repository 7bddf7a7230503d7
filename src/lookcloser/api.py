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

__all__ = [
    "TrainResult",
    "train",
    "load",
    "evaluate",
    "predict",
    "explain",
    "export",
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
    from lookcloser.data.meta import check_meta_keys
    from lookcloser.methods.base import method_class
    from lookcloser.models.heads import head_factory
    from lookcloser.semi import check_semi

    cfg.validate()
    check_semi(cfg)
    cls = method_class(cfg.method.get("name", "baseline"), cfg.method.get("module"))
    method_options(cfg, cls.Options)
    head_factory(cfg.model.head)
    if check_meta_keys(cfg.data.meta_keys) and not cls.accepts_meta:
        raise ConfigError(
            f"data.meta_keys: method {cls.name!r} does not use metadata; leave data.meta_keys "
            "empty or choose a method that takes it"
        )
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
    _save(run_dir, inference, data, cfg, metrics, interpolation, training)
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
        if split == "test":
            write_confusion(metrics["confusion"], predictor.classes, run_dir)
    atomic_write_text(run_dir / "metrics.json", json.dumps(full, indent=2) + "\n")
    return full


def _split_outputs(predictor: Predictor, cfg: Config, progress: bool, split: str, index, samples):
    """The Predictor's logits over one split of a source or of shards (None if empty)."""
    if index is None:
        if not samples:
            return None
        return predictor.run_samples(
            samples, cfg.data.batch_size, cfg.data.num_workers, progress, f"evaluate {split}"
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
        transform=predictor.transform,
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
    save_model_dir(run_dir, inference.state_dict(), info)


def load(model_dir: str | Path, device: str = "cpu") -> Predictor:
    """Load a model directory as a Predictor."""
    return Predictor.load(model_dir, device)


def evaluate(
    model_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    write_to: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a saved model on its test split (or on data.* overrides)."""
    from lookcloser.data.prepare import verified
    from lookcloser.evaluation import compute_metrics, summary, write_confusion

    predictor = load(model_dir, device)
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
    metrics = compute_metrics(out.logits, out.labels, predictor.classes)
    if write_to is not None:
        write_confusion(metrics["confusion"], predictor.classes, write_to)
    return {**summary(metrics), "most_confused": metrics["most_confused"]}


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
) -> list:
    """Top-k predictions for files and folders (`on_bad_image="skip"`: see `.skipped`).

    `meta`: per-image metadata for models that take it: a CSV / JSON file (see
    `data.meta.read_meta_file`), a mapping of path -> dict, or one dict per image.
    """
    return load(model_dir).predict(
        paths,
        top_k=top_k,
        batch_size=batch_size,
        on_bad_image=on_bad_image,
        meta=_meta_argument(meta),
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
) -> Path:
    """Write the image and its attention heatmap side by side as a PNG; returns its path.

    `meta`: the image's metadata dict, or a CSV / JSON metadata file to look the image up in.
    `part`: show part map K and the image it samples (methods with part maps: TASN).
    """
    from lookcloser.data.meta import same_path
    from lookcloser.explain.overlay import save_explanation

    if isinstance(meta, str | Path):
        meta = _meta_argument(meta).get(same_path(image), {})
    explanation = load(model_dir).explain(image, target, map_name, meta, part)
    name = Path(image).stem + (f"-part{part}" if part is not None else "")
    out = Path(out) if out else Path(model_dir) / "explanations" / f"{name}.png"
    return save_explanation(explanation, out, map_name=map_name)


def export(
    model_dir: str | Path, format: str = "onnx", out: str | Path | None = None
) -> tuple[Path, float]:
    """Export to ONNX and check it: returns the file and the max |logit| difference to PyTorch."""
    from lookcloser.export.onnx import export_onnx, max_abs_difference

    if format != "onnx":
        raise ConfigError(f"export --format: only 'onnx' is supported, got {format!r}")
    predictor = load(model_dir)
    out = Path(out) if out else Path(model_dir) / "model.onnx"
    export_onnx(predictor, out)
    return out, max_abs_difference(predictor, out)


def ood_report(run_dir: str | Path, per_row: int = 6, groups: int = 8) -> list[dict[str, Any]]:
    """What each semi-supervised stage of a run kept and why; writes a picture per stage
    (RUN_DIR/semi/report-<stage>.png) and returns each stage's summary."""
    from lookcloser.semi.report import ood_report as report

    return report(run_dir, per_row=per_row, groups=groups)
