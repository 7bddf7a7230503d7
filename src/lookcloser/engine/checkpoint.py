"""The run's checkpoint: `last.ckpt` at every epoch end and, if asked, every N optimizer steps.

Written here rather than with Lightning's ModelCheckpoint: with `save_top_k=0` that callback
writes `last.ckpt` only when a top-k file was written too, so a run killed before its end left
nothing to resume from. This one always keeps the newest state, atomically (Lightning writes
through an fsspec transaction), so a run killed at any point resumes from its last save.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class LastCheckpoint(Checkpoint):
    """Saves `dirpath/last.ckpt` at every epoch end and every `every_n_steps` optimizer steps."""

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int | None = None,
        on_saved: Callable[[Path], None] | None = None,
    ):
        super().__init__()
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.on_saved = on_saved

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every N optimizer steps (mid-epoch checkpoints for long epochs)."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """At every epoch end (after that epoch's validation)."""
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero and self.on_saved is not None:
            self.on_saved(self.path)
