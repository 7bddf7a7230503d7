"""RunDir decisions: which folders a run may take, and how an overwritten run comes back."""

from __future__ import annotations

import os

import pytest

from lookcloser.errors import ConfigError
from lookcloser.modeldir import backup_note, backup_path
from lookcloser.rundir import MARKER, RunDir, RunLock, lock_path


def _run(path, *, finished=False, checkpoint=False):
    """A folder as lookcloser leaves it: marker, config, and optionally a checkpoint / model."""
    path.mkdir(parents=True)
    (path / MARKER).write_text("{}\n")
    (path / "config.yaml").write_text("seed: 0\n")
    if checkpoint:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    if finished:
        (path / "model.json").write_text("{}\n")
    return path


def test_new_and_empty_folders_are_new_runs(tmp_path):
    assert RunDir.plan(tmp_path / "absent", resume=None, overwrite=False).mode == "new"
    (tmp_path / "empty").mkdir()
    plan = RunDir.plan(tmp_path / "empty", resume=None, overwrite=False)
    assert plan.mode == "new" and plan.existed_empty


def test_finished_and_unfinished_runs_need_a_decision(tmp_path):
    done = _run(tmp_path / "done", finished=True, checkpoint=True)
    with pytest.raises(ConfigError, match="already holds a trained model"):
        RunDir.plan(done, resume=None, overwrite=False)
    assert RunDir.plan(done, resume=None, overwrite=True).mode == "replace"
    half = _run(tmp_path / "half", checkpoint=True)
    with pytest.raises(ConfigError, match="trainer.resume=last"):
        RunDir.plan(half, resume=None, overwrite=False)
    assert RunDir.plan(half, resume="last", overwrite=False).mode == "resume"


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        RunDir.plan(_run(tmp_path / "r"), resume="last", overwrite=False)


def test_own_failed_start_is_taken_over_without_overwrite(tmp_path):
    started = _run(tmp_path / "started")  # marker and config only: died before a checkpoint
    assert RunDir.plan(started, resume=None, overwrite=False).mode == "replace"


def test_old_run_comes_back_after_a_kill_before_the_first_checkpoint(tmp_path):
    out = _run(tmp_path / "run", finished=True, checkpoint=True)
    plan = RunDir.plan(out, resume=None, overwrite=True)
    plan.claim("seed: 1\n", [])  # the old run is now aside; the new one is half-made
    assert backup_path(out).is_dir() and not (out / "model.json").exists()
    # SIGKILL here: nothing ran abandon(). The next start at the same out restores the old run.
    with pytest.raises(ConfigError, match="already holds a trained model"):
        RunDir.plan(out, resume=None, overwrite=False)
    assert (out / "model.json").is_file() and (out / "config.yaml").read_text() == "seed: 0\n"
    assert not backup_path(out).exists()


def test_backup_is_dropped_once_the_new_run_has_a_checkpoint(tmp_path):
    out = _run(tmp_path / "run", finished=True, checkpoint=True)
    plan = RunDir.plan(out, resume=None, overwrite=True)
    plan.claim("seed: 1\n", ["bad.jpg: empty file"])
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"new")
    plan.checkpoint_saved()
    assert not backup_path(out).exists()
    plan.abandon()  # a failure after the first checkpoint keeps the resumable new run
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"new"
    assert (out / "skipped.txt").read_text() == "bad.jpg: empty file\n"


def test_abandon_empties_a_folder_that_existed_empty(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    plan = RunDir.plan(out, resume=None, overwrite=False)
    plan.claim("seed: 0\n", [])
    plan.abandon()
    assert out.is_dir() and not list(out.iterdir())


def test_a_file_is_not_a_run_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        RunDir.plan(tmp_path / "f", resume=None, overwrite=False)


def test_best_ckpt_alone_is_a_checkpoint_to_resume(tmp_path):
    # A kill between the epoch's best.ckpt and last.ckpt leaves best.ckpt only.
    out = _run(tmp_path / "run")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "best.ckpt").write_bytes(b"ckpt")
    assert RunDir.plan(out, resume="last", overwrite=False).mode == "resume"
    with pytest.raises(ConfigError, match="unfinished run"):
        RunDir.plan(out, resume=None, overwrite=False)


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    out = tmp_path / "deep" / "er" / "run"
    with RunLock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        # flock conflicts between two open files even within one process.
        with pytest.raises(
            ConfigError, match=rf"{out} is in use by another training \(pid {os.getpid()}"
        ):
            RunLock(out).acquire()
    # Released: the lock file and the folders made for it are gone, and the next one gets it.
    assert not (tmp_path / "deep").exists()
    with RunLock(out):
        pass


def test_a_dead_holders_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text("999999999\n")  # left by a process killed with SIGKILL
    with RunLock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"


def test_backup_note_says_where_the_old_run_waits(tmp_path):
    out = _run(tmp_path / "run")
    assert backup_note(out) == ""
    backup_path(out).mkdir()
    assert str(backup_path(out)) in backup_note(out) and f"out={out}" in backup_note(out)
