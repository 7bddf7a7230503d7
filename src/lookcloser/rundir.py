"""Run directories: written only by the run that owns them, never half-made, never clobbered.

A run directory is claimed only after the run's config, data and model have passed every
check. It carries a marker file, so lookcloser knows which folders it made: `out=` refuses a
non-empty folder without one. `overwrite=true` moves the old run aside (a hidden sibling) and
brings it back if the new run fails before its first checkpoint; the first checkpoint makes
the new run resumable, and only then is the old one deleted. A run killed before that point
leaves the old run beside it, and the next start at the same `out` puts it back first.

One training at a time owns a run directory: `RunLock` holds an exclusive `flock` on
`.NAME.lock` beside it (beside, not inside: the folder may not exist yet, and an overwrite
moves it aside) from before `RunDir.plan` until the run ends. The kernel drops the lock when
its process dies, so a killed run never leaves `out` locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from lookcloser.errors import ConfigError
from lookcloser.fileio import atomic_write_text
from lookcloser.modeldir import backup_path, is_model_dir

log = logging.getLogger(__name__)

MARKER = ".lookcloser-run"
CHECKPOINTS = Path("checkpoints")
LAST_CHECKPOINT = CHECKPOINTS / "last.ckpt"

Mode = Literal["new", "resume", "replace"]


def has_checkpoint(path: Path) -> bool:
    """Whether a run directory holds a checkpoint to resume from (last.ckpt, or best.ckpt of
    a run killed between the two end-of-epoch saves; every checkpoint is written whole)."""
    folder = Path(path) / CHECKPOINTS
    return folder.is_dir() and any(p.is_file() for p in folder.glob("*.ckpt"))


def is_run_dir(path: Path) -> bool:
    """Whether lookcloser made this folder (its marker, or a finished model from before markers)."""
    return (path / MARKER).is_file() or is_model_dir(path)


def lock_path(path: str | Path) -> Path:
    """The lock file of a run directory: `.NAME.lock` beside it."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.lock"


class RunLock:
    """One training at a time per run directory (a context manager): an exclusive, non-blocking
    `flock` on `lock_path(path)`, which holds the owner's pid for the message another start
    gets. Released (and the file removed) on exit; the kernel releases it if the process dies.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = lock_path(path)
        self._fd: int | None = None
        self._made: list[Path] = []  # folders made for the lock file, removed again if empty

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise a ConfigError naming the folder and the holder's pid."""
        self._make_parents()
        try:
            for _ in range(5):
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    replaced = not _same_file(fd, self.file)
                    os.close(fd)
                    if replaced:  # the holder just finished and removed it: try again
                        continue
                    raise ConfigError(
                        f"out: {self.path} is in use by another training "
                        f"(pid {holder or 'unknown'}, lock {self.file}); wait for it to end "
                        "or choose another out"
                    ) from None
                if not _same_file(fd, self.file):  # locked a file its holder just removed
                    os.close(fd)
                    continue
                with contextlib.suppress(OSError):  # the pid is for messages only
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
        except OSError as err:
            self._remove_parents()
            raise ConfigError(
                f"out: cannot lock {self.path} ({err.strerror}: {self.file}); the folder that "
                "holds the run must be writable"
            ) from None
        self._remove_parents()
        raise ConfigError(f"out: {self.path} is being taken by other trainings; try again")

    def release(self) -> None:
        """Remove the lock file and let go (removed while held, so no one holds a stale copy)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.file):
                self.file.unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_parents()

    def _make_parents(self) -> None:
        missing = []
        folder = self.file.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                self._remove_parents()
                raise ConfigError(f"out: cannot create {folder} ({err.strerror})") from None
            self._made.append(folder)

    def _remove_parents(self) -> None:
        # A run that never started leaves no folder behind, not even the ones above it.
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self._made = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


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
        if self.mode == "resume":
            # A training killed while writing a checkpoint left its temporary file; no other
            # process writes here now (RunLock), so every one is stale.
            for stale in (self.path / CHECKPOINTS).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        else:
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
        log.warning(
            "out: removed %s, the old run %s replaced (it has a checkpoint now)", backup, path
        )
        return
    if path.exists():
        if not (path / MARKER).is_file():
            log.warning(
                "out: %s is not a run of lookcloser, so the run a killed overwrite moved aside "
                "stays at %s (move it back by hand)",
                path,
                backup,
            )
            return
        _remove(path)
    os.replace(backup, path)
    log.warning(
        "out: restored %s from %s (an overwrite was killed before its first checkpoint)",
        path,
        backup,
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
