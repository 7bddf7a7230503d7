"""Run directories: written only by the run that owns them, never half-made, never clobbered.

A run directory is claimed only after the run's config, data and model have passed every
check. It carries a marker file, so lookcloser knows which folders it made: `out=` refuses a
non-empty folder without one. `overwrite=true` moves the old run aside (a hidden sibling) and
brings it back if the new run fails before its first checkpoint; the first checkpoint makes
the new run resumable, and only then is the old one deleted. A run killed before that point
leaves the old run beside it, and the next start at the same `out` puts it back first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from lookcloser.errors import ConfigError
from lookcloser.modeldir import atomic_write_text, is_model_dir

MARKER = ".lookcloser-run"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

Mode = Literal["new", "resume", "replace"]


def has_checkpoint(path: Path) -> bool:
    """Whether a run directory holds a checkpoint to resume from."""
    return (path / LAST_CHECKPOINT).is_file()


def is_run_dir(path: Path) -> bool:
    """Whether lookcloser made this folder (its marker, or a finished model from before markers)."""
    return (path / MARKER).is_file() or is_model_dir(path)


def backup_path(path: Path) -> Path:
    """Where an overwritten run waits until the new run has its first checkpoint."""
    return path.parent / f".{path.name}.previous"


@dataclass
class RunDir:
    """A run directory and what this run may do with it (see `plan`)."""

    path: Path
    mode: Mode
    existed_empty: bool = False
    claimed: bool = False

    @classmethod
    def plan(cls, path: str | Path, *, resume: str | None, overwrite: bool) -> RunDir:
        """Decide what this run may do with `path`, writing nothing (except an old-run rescue).

        `resume` is `trainer.resume`: `last` needs this folder's checkpoint; a checkpoint path
        continues in this folder if it is a run, or starts a new one here.
        """
        path = Path(path)
        _restore_after_failed_start(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out: {path} exists and is not a folder")
        contents = list(path.iterdir()) if path.is_dir() else []
        if resume == "last" or (resume is not None and has_checkpoint(path)):
            if not has_checkpoint(path):
                raise ConfigError(
                    f"trainer.resume=last: no checkpoint in {path / LAST_CHECKPOINT.parent}; "
                    "nothing to resume (start without trainer.resume)"
                )
            return cls(path, "resume")
        if not contents:
            return cls(path, "new", existed_empty=path.is_dir())
        if not is_run_dir(path):
            raise ConfigError(
                f"out: {path} is not empty and was not made by lookcloser; "
                "choose a new or empty folder (its files are left untouched)"
            )
        if overwrite:
            return cls(path, "replace")
        if is_model_dir(path):
            raise ConfigError(
                f"out: {path} already holds a trained model; pass overwrite=true or choose another out"
            )
        if has_checkpoint(path):
            raise ConfigError(
                f"out: {path} holds an unfinished run; resume it with trainer.resume=last, "
                "or pass overwrite=true to start again"
            )
        # Our own run that died before its first checkpoint: nothing in it is worth keeping.
        return cls(path, "replace")

    def claim(self, config_yaml: str, skipped: list[str]) -> None:
        """Create (or take over) the folder and write the run's config; the old run moves aside."""
        if self.mode == "replace":
            backup = backup_path(self.path)
            if backup.exists():
                _remove(backup)
            os.replace(self.path, backup)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.mode != "resume":
            stamp = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "pid": os.getpid()}
            atomic_write_text(self.path / MARKER, json.dumps(stamp) + "\n")
        atomic_write_text(self.path / "config.yaml", config_yaml)
        if skipped:
            atomic_write_text(self.path / "skipped.txt", "\n".join(skipped) + "\n")
        self.claimed = True

    def checkpoint_saved(self) -> None:
        """The run can now be resumed on its own: the run it replaced is no longer needed."""
        backup = backup_path(self.path)
        if self.mode == "replace" and backup.exists():
            _remove(backup)

    def abandon(self) -> None:
        """After a failure: remove a run that never reached a checkpoint; bring back the old one."""
        if not self.claimed or self.mode == "resume" or has_checkpoint(self.path):
            return
        if self.existed_empty:
            for child in self.path.iterdir():
                _remove(child)
        else:
            _remove(self.path)
        backup = backup_path(self.path)
        if backup.exists():
            os.replace(backup, self.path)
        self.claimed = False


def _restore_after_failed_start(path: Path) -> None:
    """A run killed before its first checkpoint left the run it replaced aside: put it back."""
    backup = backup_path(path)
    if not backup.is_dir():
        return
    if path.exists() and (has_checkpoint(path) or is_model_dir(path)):
        _remove(backup)  # the new run got far enough; the old one was due for deletion
        return
    if path.exists():
        if not (path / MARKER).is_file():
            return  # not ours: leave both alone
        _remove(path)
    os.replace(backup, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
