"""The run's checkpoints: `last.ckpt` at every epoch end (and, if asked, every N optimizer
steps), and `best.ckpt` whenever the validation top-1 improves.

Written here rather than with Lightning's ModelCheckpoint: with `save_top_k=0` that callback
writes `last.ckpt` only when a top-k file was written too, so a run killed before its end left
nothing to resume from. This one always keeps the newest state, atomically (Lightning writes
through an fsspec transaction), so a run killed at any point resumes from its last save. The
best is chosen on the validation split only (the test split never reaches training).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class RunCheckpoints(Checkpoint):
    """`dirpath/last.ckpt` at every epoch end and every `every_n_steps` optimizer steps;
    `dirpath/best.ckpt` at the end of each epoch whose `val/top1` beats every earlier one."""

    monitor = "val/top1"

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int | None = None,
        on_saved: Callable[[Path], None] | None = None,
    ):
        super().__init__()
        self.path = Path(dirpath) / "last.ckpt"
        self.best_path = Path(dirpath) / "best.ckpt"
        self.every_n_steps = every_n_steps
        self.on_saved = on_saved
        self.best: float | None = None  # saved in every checkpoint, so it survives a resume

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every N optimizer steps (mid-epoch checkpoints for long epochs)."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """At every epoch end (after that epoch's validation): the best, then the last."""
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and (self.best is None or float(score) > self.best):
            self.best = float(score)
            self._save(trainer, self.best_path)
        self._save(trainer)

    def state_dict(self) -> dict:
        """The best validation score so far."""
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the best score when resuming."""
        self.best = state_dict.get("best")

    def _save(self, trainer: L.Trainer, path: Path | None = None) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = path or self.path
        trainer.save_checkpoint(path)
        if trainer.is_global_zero and self.on_saved is not None:
            self.on_saved(path)
