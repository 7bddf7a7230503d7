"""The Lightning Trainer a config asks for: devices, precision, checkpoints, logs, progress."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lookcloser.config import Config
from lookcloser.engine.checkpoint import AtomicCheckpointIO, RunCheckpoints
from lookcloser.engine.threads import CPUThreads


class _WithoutVersion:
    """Progress bar metrics without Lightning's `v_num` (our logger versions are folder names)."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RichBar(_WithoutVersion, RichProgressBar):
    """Lightning's rich progress bar, minus `v_num`."""


class TQDMBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's tqdm progress bar, minus `v_num`."""


def build_trainer(
    cfg: Config,
    run_dir: Path,
    progress: bool = True,
    has_val: bool = True,
    callbacks: list | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    data_record: dict | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints and CSV + TensorBoard logs under `run_dir`.

    `on_checkpoint(path)` is called (on rank 0) after every checkpoint is written;
    `data_record` (`engine.checkpoint.data_record`) is stored in every checkpoint.
    """
    # Lightning's info lines (available accelerators, tips) are noise in a CLI; warnings stay.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t = cfg.trainer
    callbacks = list(callbacks or []) + [
        RunCheckpoints(
            run_dir / "checkpoints", t.checkpoint_every_n_steps, on_checkpoint, data_record
        ),
        CPUThreads(_fixed_threads(t.cpu_threads, t.deterministic)),
    ]
    if progress and t.progress == "rich":
        callbacks.append(RichBar(leave=True))
    elif progress and t.progress == "tqdm":
        callbacks.append(TQDMBar())
    validate = has_val and t.val_every_n_epochs > 0
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        deterministic=t.deterministic,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        check_val_every_n_epoch=max(1, t.val_every_n_epochs),
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=[
            CSVLogger(run_dir, name="logs", version=_csv_version(run_dir, t.resume is not None)),
            TensorBoardLogger(run_dir, name="logs", version="tensorboard"),
        ],
        callbacks=callbacks,
        # Checkpoints written beside their target and moved into place (never via $TMPDIR).
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress and t.progress != "none",
        enable_model_summary=False,
        use_distributed_sampler=False,  # the EpochSampler splits data across ranks itself
    )


def _fixed_threads(cpu_threads: int | str, deterministic: bool) -> int | None:
    """A fixed torch thread count, or None to follow the free cores. Deterministic runs keep
    theirs: CPU kernels sum in another order with another thread count, so a run whose
    threads followed the machine's load would not repeat bit for bit."""
    if cpu_threads != "auto":
        return int(cpu_threads)
    return torch.get_num_threads() if deterministic else None


def _csv_version(run_dir: Path, resuming: bool) -> str:
    """`csv`, or `csv-resume-N` when resuming (Lightning's CSVLogger would overwrite the old file)."""
    if not resuming:
        return "csv"
    n = 1
    while (run_dir / "logs" / f"csv-resume-{n}").exists():
        n += 1
    return f"csv-resume-{n}"
