"""The run's checkpoints: `last.ckpt` at every epoch end (and, if asked, every N optimizer
steps), and `best.ckpt` whenever the validation top-1 improves.

Written here rather than with Lightning's ModelCheckpoint: with `save_top_k=0` that callback
writes `last.ckpt` only when a top-k file was written too, so a run killed before its end left
nothing to resume from. This one always keeps the newest state. The best is chosen on the
validation split only (the test split never reaches training).

Every file is written by `AtomicCheckpointIO`: a temporary file in the checkpoint's own folder,
fsynced, then moved over the old one (`lookcloser.fileio`). Lightning's own writer stages under
$TMPDIR and, when the run is on another filesystem, copies over the old checkpoint in place,
so a kill during the copy destroyed the only checkpoint. Each checkpoint also records a save
number and the run's data (`data_record`): a resume continues from the newest complete
checkpoint whatever its name (`newest_checkpoint`), and refuses data that changed since
(`check_resume_data`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from lookcloser.data.table import sample_labels, sample_paths
from lookcloser.errors import ConfigError
from lookcloser.fileio import WriteError, atomic_open

log = logging.getLogger(__name__)

SAVE_KEY = "lookcloser_save"  # the save number: orders checkpoints of the same step
DATA_KEY = "lookcloser_data"  # the classes and training index the run was trained on


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint format, written as every lookcloser file is: to a temporary
    file beside the target, fsynced, then `os.replace`d, so the previous checkpoint stays
    whole until the new one is complete (on any filesystem), and a full disk is a WriteError
    naming the file. Lightning calls it on the global-zero process only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write `checkpoint` to `path` atomically."""
        if "://" in str(path):  # a remote URL (fsspec): Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(
                f"{path.parent}: could not create the folder ({err.strerror})"
            ) from err
        with atomic_open(path, "wb") as f:
            try:
                torch.save(checkpoint, f)
            except RuntimeError as err:
                # torch's zip writer turns a failed write (a full disk) into "unexpected pos";
                # the OSError it was handling says what happened, and becomes a WriteError.
                cause = _os_error(err)
                if cause is None:
                    raise
                raise cause from None


def _os_error(err: BaseException) -> OSError | None:
    """The OSError an exception was raised while handling, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class RunCheckpoints(Checkpoint):
    """`dirpath/last.ckpt` at every epoch end and every `every_n_steps` optimizer steps;
    `dirpath/best.ckpt` at the end of each epoch whose `val/top1` beats every earlier one.

    `data` (from `data_record`) is stored in every checkpoint for `check_resume_data`.
    """

    monitor = "val/top1"

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int | None = None,
        on_saved: Callable[[Path], None] | None = None,
        data: dict | None = None,
    ):
        super().__init__()
        self.path = Path(dirpath) / "last.ckpt"
        self.best_path = Path(dirpath) / "best.ckpt"
        self.every_n_steps = every_n_steps
        self.on_saved = on_saved
        self.data = data
        self.best: float | None = None  # saved in every checkpoint, so it survives a resume
        self.saves = 0  # likewise: the save number keeps rising across resumes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every N optimizer steps (mid-epoch checkpoints for long epochs), except on an
        epoch's last batch: Lightning resumes a checkpoint saved there inside the epoch and
        trains one batch too many; the epoch-end save follows at once anyway."""
        step = trainer.global_step
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.every_n_steps and step % self.every_n_steps == 0 and not last:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        """At every epoch end (after that epoch's validation): the best, then the last.

        Best first: both hold the same state, and a kill between the two leaves best.ckpt as
        the newest checkpoint, which a resume takes (`newest_checkpoint`); saving last first
        would instead leave best.ckpt an older state than the best score the run records.
        """
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and (self.best is None or float(score) > self.best):
            self.best = float(score)
            self._save(trainer, self.best_path)
        self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        """Record the save number and the run's data in the checkpoint."""
        checkpoint[SAVE_KEY] = self.saves
        if self.data is not None:
            checkpoint[DATA_KEY] = self.data

    def state_dict(self) -> dict:
        """The best validation score so far, and the number of saves."""
        return {"best": self.best, "saves": self.saves}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the best score and the save count when resuming."""
        self.best = state_dict.get("best")
        self.saves = state_dict.get("saves", 0)

    def _save(self, trainer: L.Trainer, path: Path | None = None) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = path or self.path
        self.saves += 1
        trainer.save_checkpoint(path)
        if trainer.is_global_zero and self.on_saved is not None:
            self.on_saved(path)


# ---- resuming ------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, its tensors memory-mapped (reading the step is cheap)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) or "zipfile" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format


def _order(checkpoint: dict, name: str) -> tuple:
    """Which of two checkpoints is newer: later step, later epoch, later save; last.ckpt on
    a tie (checkpoints from before save numbers)."""
    return (
        checkpoint.get("global_step", -1),
        checkpoint.get("epoch", -1),
        checkpoint.get(SAVE_KEY, -1),
        name == "last.ckpt",
    )


def newest_checkpoint(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in `folder` (by the step and save number it records,
    whatever its name) and its contents; None if there is none. A file that does not load
    (a checkpoint cut short by an older lookcloser) is passed over with a warning."""
    best: tuple[tuple, Path, dict] | None = None
    for path in sorted(Path(folder).glob("*.ckpt")):
        try:
            checkpoint = read_checkpoint(path)
        except Exception as err:  # truncated, empty, not a checkpoint: whatever torch says
            log.warning("%s: not a complete checkpoint (%s); passed over", path, err)
            continue
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            log.warning("%s: not a Lightning checkpoint; passed over", path)
            continue
        key = _order(checkpoint, path.name)
        if best is None or key > best[0]:
            best = (key, path, checkpoint)
    return None if best is None else (best[1], best[2])


def describe(checkpoint: dict) -> str:
    """`epoch E, step S` of a checkpoint, for log lines."""
    return f"epoch {checkpoint.get('epoch', '?')}, step {checkpoint.get('global_step', '?')}"


# ---- the data a run was trained on ---------------------------------------------------------------
def data_record(data) -> dict:
    """What a checkpoint records about a run's data (`TrainingData`): the classes, the number
    of training images and a fingerprint of the training index, computed in linear time: a
    sum of hashes of each (path, label), so the order of the list does not matter, and paths
    relative to their common folder, so a data set moved as a whole is still the same."""
    if data.index is not None:
        # Shards: the training shards' names; their samples are not listed up front.
        items = [(url.rsplit("/", 1)[-1], -1) for url in data.index.urls.get("train", [])]
    else:
        # Paths and labels only: a SampleTable builds no Sample for them.
        labels = sample_labels(data.train).tolist()
        items = [(str(p), y) for p, y in zip(sample_paths(data.train), labels, strict=True)]
    prefix = os.path.commonprefix([p for p, _ in items]) if items else ""
    cut = max(prefix.rfind("/"), prefix.rfind(os.sep)) + 1  # 0 without a separator
    total = 0
    for path, label in items:
        digest = hashlib.blake2b(f"{path[cut:]}\0{label}".encode(), digest_size=16).digest()
        total = (total + int.from_bytes(digest, "big")) % (1 << 128)
    return {
        "classes": list(data.classes),
        "train_images": data.count("train"),
        "train_index": f"{total:032x}",
    }


def check_resume_data(checkpoint: dict, current: dict, path: str | Path) -> None:
    """Refuse to resume from `checkpoint` (at `path`) on data other than it was trained on:
    a ConfigError saying what changed (classes, training images). A checkpoint from before
    the record resumes with a warning."""
    saved = checkpoint.get(DATA_KEY)
    if not isinstance(saved, dict):
        log.warning(
            "%s records no data fingerprint (saved by an older lookcloser): resuming without "
            "checking that the classes and training images are the ones it was trained on",
            path,
        )
        return
    changes = []
    old, new = list(saved.get("classes", [])), current["classes"]
    if old != new:
        removed = [c for c in old if c not in set(new)]
        added = [c for c in new if c not in set(old)]
        if removed and added and len(removed) == len(added):
            changes.append(
                f"classes renamed or replaced: removed: {', '.join(removed)}; "
                f"added: {', '.join(added)}"
            )
        elif removed or added:
            parts = [f"removed: {', '.join(removed)}"] if removed else []
            parts += [f"added: {', '.join(added)}"] if added else []
            changes.append(f"classes {'; '.join(parts)} ({len(old)} before, {len(new)} now)")
        else:
            changes.append("the same classes in another order (every label index would shift)")
    before, now = saved.get("train_images"), current["train_images"]
    if before != now:
        changes.append(f"training images: {before} before, {now} now")
    elif saved.get("train_index") != current["train_index"]:
        changes.append(f"training images changed (other files or labels; {now} before and now)")
    if changes:
        raise ConfigError(
            f"trainer.resume: the data differ from those {path} was trained on: "
            + "; ".join(changes)
            + ". Resume with the same data, or start a new run (overwrite=true or another out)"
        )
