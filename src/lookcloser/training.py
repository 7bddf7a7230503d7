"""One training run from a checked config: the run directory (locked, claimed only once
everything passed), the Lightning engine, the final report on the val and test splits and the
model directory. Every workflow that trains (`api.train`, `compare`'s missing runs, the
cluster_pretrain stages) runs its trainings through `train` here; nothing here knows them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lookcloser.config import Config
from lookcloser.errors import ConfigError, DataError, unwrapped
from lookcloser.predictor import Predictor
from lookcloser.scoring import split_stream
from lookcloser.tta import TTA

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    metrics: dict[str, Any]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def global_rank() -> int:
    """This process's rank when launched by Lightning's DDP launcher or torchrun (else 0)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", 0))
    return node * 1000 + local  # only "is it zero" matters here


def run_dir_for(cfg: Config, rank_zero: bool) -> Path:
    """The run directory: `out`, or runs/<time>-<method>-<backbone>; in a DDP child, rank 0's."""
    # DDP children re-run the command; they must use the directory rank 0 chose.
    if not rank_zero and os.environ.get("LOOKCLOSER_RUN_DIR"):
        return Path(os.environ["LOOKCLOSER_RUN_DIR"])
    if cfg.out:
        return Path(cfg.out).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backbone = cfg.model.backbone.replace("/", "_")
    return Path("runs") / f"{stamp}-{cfg.method.get('name', 'baseline')}-{backbone}"


def resume_from(cfg: Config, run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its contents: `last` is the run's newest complete
    checkpoint, whatever its name (best.ckpt when a kill fell between the epoch's two saves)."""
    from lookcloser.engine.checkpoint import (
        describe,
        newest_checkpoint,
        read_checkpoint,
    )

    resume = cfg.trainer.resume
    if resume is None:
        return None
    if resume == "last":
        found = newest_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise ConfigError(
                f"trainer.resume=last: no complete checkpoint in {run_dir / 'checkpoints'}"
            )
    else:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"trainer.resume: checkpoint not found: {path}")
        try:
            found = path, read_checkpoint(path)
        except Exception as err:  # truncated, or not a checkpoint
            raise ConfigError(
                f"trainer.resume: {path} is not a complete checkpoint ({err})"
            ) from None
    if global_rank() == 0:  # DDP children re-run this: one line is enough
        log.warning("trainer.resume: continuing from %s (%s)", found[0], describe(found[1]))
    return found


def train(
    cfg: Config, *, progress: bool = True, callbacks: list | None = None
) -> TrainResult | None:
    """One training run of a config `checks.check_config` passed: train the method, evaluate
    it on the val and test splits and write the model directory.

    Nothing is written until the config, the data and the model have passed their checks; a
    run that fails before its first checkpoint leaves no directory behind (and an overwritten
    run is put back). `callbacks` are extra Lightning callbacks. Returns None in DDP
    processes other than rank 0.
    """
    from lookcloser.rundir import RunLock

    rank_zero = global_rank() == 0
    run_dir = run_dir_for(cfg, rank_zero)
    # DDP children re-run the command; only rank 0 owns the directory, and locks it before
    # deciding anything about it: a second training with the same out= is refused.
    with RunLock(run_dir) if rank_zero else contextlib.nullcontext():
        return _train_owned(cfg, run_dir, rank_zero, progress, callbacks)


def _train_owned(
    cfg: Config, run_dir: Path, rank_zero: bool, progress: bool, callbacks: list | None
) -> TrainResult | None:
    from lookcloser.rundir import RunDir

    plan = (
        RunDir.plan(run_dir, resume=cfg.trainer.resume, overwrite=cfg.overwrite)
        if rank_zero
        else None
    )
    previous = os.environ.get("LOOKCLOSER_RUN_DIR")
    os.environ["LOOKCLOSER_RUN_DIR"] = str(run_dir.resolve())  # inherited by DDP children
    try:
        return _train(cfg, run_dir, plan, progress, callbacks)
    except BaseException as err:
        if plan is not None:
            plan.abandon()
        if unwrapped(err) is not err:  # a DataLoader worker's error: the original one line
            raise unwrapped(err) from None
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
    from lookcloser.engine.checkpoint import check_resume_data, data_record
    from lookcloser.engine.datamodule import build_datamodule
    from lookcloser.engine.module import FGVCSystem
    from lookcloser.engine.trainer import build_trainer
    from lookcloser.methods import build_method
    from lookcloser.semi import build_objective, check_validation, unlabelled_transform

    resume = resume_from(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Shards: classes and counts from the index; bad images are handled while decoding
    # (data.on_bad_image), as no up-front pass over millions of files is made.
    # The verification bar only on a terminal: a log or a pipe gets the result, not the bar.
    data = prepare_data(cfg.data, None if progress else False)
    record = data_record(data)
    if resume is not None:  # refused before anything is written if the data changed
        check_resume_data(resume[1], record, resume[0])
    ckpt_path = str(resume[0]) if resume is not None else None
    del resume  # its tensors are memory-mapped; Lightning reads the file itself
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
        data_record=record,
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
    metrics = evaluate_and_write(predictor, cfg, data, run_dir, progress)
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
    save_run_model(run_dir, inference, data, cfg, metrics, interpolation, training, predictor.tta)
    return TrainResult(run_dir, metrics, data.classes, data.skipped)


def evaluate_and_write(
    predictor: Predictor, cfg: Config, data, run_dir: Path, progress: bool
) -> dict[str, Any]:
    """metrics.json: the final model on the val split and on the test split (read only now)."""
    from lookcloser.evaluation import stream_metrics, summary, write_confusion
    from lookcloser.fileio import atomic_write_text

    full = {}
    for split in ("val", "test"):
        stream = split_stream(predictor, cfg, progress, split, data.index, getattr(data, split))
        if stream is None:
            continue
        metrics = stream_metrics(stream, predictor.classes, split)
        full[split] = {**summary(metrics), "most_confused": metrics["most_confused"]}
        if predictor.tta is not None:
            full[split]["tta"] = predictor.tta.spec()
        if split == "test":
            write_confusion(metrics["confusion_counts"], predictor.classes, run_dir)
    atomic_write_text(run_dir / "metrics.json", json.dumps(full, indent=2) + "\n")
    return full


def save_run_model(
    run_dir: Path,
    inference,
    data,
    cfg: Config,
    metrics: dict,
    interpolation: str,
    training: dict | None = None,
    tta: TTA | None = None,
) -> None:
    """model.safetensors + model.json of the trained model: classes, preprocessing, data,
    metrics, training facts and the resolved config."""
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
