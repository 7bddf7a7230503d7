"""Red-team cases for runs and checkpoints (issue 23, failures 4-7 and the hidden old run):
kill -9 and full disks at any moment on any filesystem, one owner per run directory, and a
resumed run that refuses changed data. Every training here is a real one on tiny data; the
kills are real SIGKILLs of real training processes."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lookcloser import api
from lookcloser.errors import ConfigError
from lookcloser.fileio import WriteError

SRC = Path(__file__).resolve().parents[2] / "src"

# Seconds per run: a tiny random backbone on 32 px images (3 classes x 8 training images).
RUN = [
    "data.source=imagefolder",
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=8",
    "data.crop_pct=1.0",
    "data.val_fraction=0",
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "trainer.epochs=2",
    "trainer.progress=none",
]


@pytest.fixture(scope="module")
def runs_data(tmp_path_factory) -> Path:
    """A 3-class synthetic ImageFolder tree: 8 train + 2 test images per class, 32 px."""
    from lookcloser.data.synthetic import generate

    return generate(
        tmp_path_factory.mktemp("runs-data"), classes=3, per_class=8, test_per_class=2, size=32
    )


def _settings(root: Path, out: Path, *extra: str) -> list[str]:
    return [*RUN, f"data.root={root}", f"out={out}", *extra]


@pytest.fixture(scope="module")
def trainers():
    """Starts training processes (a multiprocessing context): each is forked from a server
    process that imported torch, Lightning and lookcloser once (and ran nothing), so a process
    to kill starts in a second rather than an import's time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "lookcloser.api",
            "lookcloser.data.prepare",
            "lookcloser.data.transforms",
            "lookcloser.engine.datamodule",
            "lookcloser.engine.module",
            "lookcloser.engine.trainer",
            "lookcloser.evaluation",
            "lookcloser.methods",
            "lookcloser.semi",
            "tensorboard",
            __name__,
        ]
    )
    yield context
    from multiprocessing import forkserver

    with contextlib.suppress(Exception):  # private, but frees the server's memory now
        forkserver._forkserver._stop()


class Hold(L.Callback):
    """Stops before the first step (holding the run) until killed; says it got there."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Path(os.environ["RUNS_TEST_READY"]).touch()
        time.sleep(600)


class Ballast(L.Callback):
    """Makes every checkpoint 32 MB, so that a kill at a random moment often lands in a write."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["ballast"] = torch.ones(8_000_000)


def _train_process(mode: str, overrides: list[str], log: str, env: dict[str, str]) -> None:
    """A training process: `hold`, `ballast` (see the callbacks) or `between-saves` (killed
    right after its first best.ckpt, before that epoch's last.ckpt). Output goes to `log`."""
    import tempfile

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    tempfile.tempdir = None  # read $TMPDIR again
    if mode == "between-saves":
        save = L.Trainer.save_checkpoint

        def save_checkpoint(self, filepath, *args, **kwargs):
            save(self, filepath, *args, **kwargs)
            if Path(filepath).name == "best.ckpt":
                os.kill(os.getpid(), signal.SIGKILL)

        L.Trainer.save_checkpoint = save_checkpoint
    callbacks = {"hold": [Hold()], "ballast": [Ballast()]}.get(mode, [])
    api.train(overrides=overrides, progress=False, callbacks=callbacks)


class _Child:
    """A training process running `_train_process(mode, ...)`; its output goes to `log`."""

    def __init__(self, context, mode: str, overrides: list[str], log: Path, **env: str):
        self.log = log
        self.process = context.Process(
            target=_train_process, args=(mode, overrides, str(log), env), daemon=True
        )
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float = 300) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def stderr(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", **extra}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _mtime(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mtime_ns
    return None


def _writing(folder: Path, full: int) -> bool:
    """Whether a checkpoint is being written in `folder` right now: a temporary file beside
    it, or a checkpoint shorter than a whole one (copied over in place)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".tmp"):
                return True
            if entry.name.endswith(".ckpt") and entry.stat().st_size < 0.9 * full:
                return True
    return False


# ---- 4. checkpoints are atomic on any filesystem ----------------------------------------------
def test_kill_9_while_checkpointing_across_filesystems_always_resumes(
    runs_data, trainers, tmp_path, tmpfs
):
    """out= on a tmpfs, $TMPDIR on disk, a 32 MB checkpoint every step, SIGKILL at random
    moments while a checkpoint is being written: every checkpoint left loads, and each
    restart resumes from it."""
    with tmpfs(tmp_path / "tmpfs", "512m") as fast:
        staging = tmp_path / "tmpdir"
        staging.mkdir()
        out = fast / "run"
        overrides = _settings(
            runs_data, out, "trainer.checkpoint_every_n_steps=1", "trainer.epochs=10"
        )
        checkpoints = out / "checkpoints"
        last = checkpoints / "last.ckpt"
        rng = random.Random(23)
        for attempt in range(5):  # 5 kills of at most 5 steps each: never the run's end
            extra = ["trainer.resume=last"] if attempt else []
            log = tmp_path / f"{attempt}.log"
            child = _Child(trainers, "ballast", [*overrides, *extra], log, TMPDIR=str(staging))
            # Let this process write 1 to 4 checkpoints, then kill it at a random point of
            # the next write (or just after it).
            writes, seen = rng.randint(1, 4), _mtime(last)
            deadline = time.monotonic() + 120
            while writes and child.poll() is None and time.monotonic() < deadline:
                if _mtime(last) != seen:
                    writes, seen = writes - 1, _mtime(last)
                time.sleep(0.002)
            until = time.monotonic() + 5
            while child.poll() is None and time.monotonic() < until:
                if _writing(checkpoints, 32_000_000):
                    time.sleep(rng.uniform(0.0, 0.03))
                    break
                time.sleep(0.001)
            child.kill()
            assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr()
            for ckpt in checkpoints.glob("*.ckpt"):  # whole, or not there at all
                assert _load(ckpt)["global_step"] >= 1, ckpt
        resumed = api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)
        assert (out / "model.json").is_file() and resumed.classes
        assert not list(checkpoints.glob("*.tmp"))  # the killed writers' temporaries are gone
        assert _load(checkpoints / "last.ckpt")["global_step"] == 30  # 10 epochs x 3 steps


def test_disk_full_while_checkpointing_names_the_file_and_keeps_the_run(runs_data, tmp_path, tmpfs):
    """A full disk at the second checkpoint: a WriteError naming last.ckpt and its folder, the
    first checkpoint intact, and the run resumes once there is room again."""
    with tmpfs(tmp_path / "small", "24m") as small:
        out = small / "run"
        filler = small / "filler"
        overrides = _settings(runs_data, out, "trainer.checkpoint_every_n_steps=1")

        class FillDisk(L.Callback):  # runs before the checkpoint callback of the same step
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == 2:
                    stat = os.statvfs(small)
                    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))

        with pytest.raises(WriteError, match=r"last\.ckpt: could not write \(no space left"):
            api.train(overrides=overrides, progress=False, callbacks=[FillDisk()])
        assert _load(out / "checkpoints" / "last.ckpt")["global_step"] == 1
        assert not list((out / "checkpoints").glob("*.tmp"))
        filler.unlink()
        api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)
        assert (out / "model.json").is_file()


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, tmpfs):
    """The checkpoint writer itself: a save that fails half-way (an unpicklable value after a
    large tensor; a full disk) leaves the previous file byte for byte, and no temporary."""
    from lookcloser.engine.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.arange(10.0)}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"weights": torch.ones(1_000_000), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    with tmpfs(tmp_path / "small", "1m") as small:
        target = small / "last.ckpt"
        io.save_checkpoint({"global_step": 1}, target)
        kept = target.read_bytes()
        with pytest.raises(WriteError, match=rf"{target}: could not write \(no space left"):
            io.save_checkpoint({"weights": torch.ones(1_000_000)}, target)  # 4 MB
        assert target.read_bytes() == kept
        assert sorted(p.name for p in small.iterdir()) == ["last.ckpt"]
    assert _load(path)["global_step"] == 1


# ---- 5. resume takes the newest complete checkpoint, whatever its name -------------------------
def test_kill_between_best_and_last_resumes_from_best(runs_data, trainers, tmp_path, caplog):
    """Killed right after the first epoch's best.ckpt, before its last.ckpt (none yet): resume
    continues from best.ckpt and says so."""
    out = tmp_path / "run"
    overrides = _settings(runs_data, out, "data.val_fraction=0.25", "trainer.val_every_n_epochs=1")
    killed = _Child(trainers, "between-saves", overrides, tmp_path / "killed.log")
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr()
    assert [p.name for p in (out / "checkpoints").glob("*.ckpt")] == ["best.ckpt"]
    with caplog.at_level(logging.INFO, logger="lookcloser"):
        api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)
    assert "best.ckpt" in caplog.text
    assert (out / "model.json").is_file()
    assert _load(out / "checkpoints" / "last.ckpt")["epoch"] == 1  # the second epoch ran


def test_a_checkpoint_cut_short_before_this_fix_is_passed_over(trained, caplog):
    """last.ckpt truncated (as Lightning's in-place copy left it) beside a whole best.ckpt:
    resume warns about the first and continues from the second."""
    data, out, resume = trained
    folder = out / "checkpoints"
    shutil.copyfile(folder / "last.ckpt", folder / "best.ckpt")
    whole = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="lookcloser"):
        api.train(overrides=resume, progress=False)
    assert f"{folder / 'last.ckpt'}: not a complete checkpoint" in caplog.text
    assert f"continuing from {folder / 'best.ckpt'}" in caplog.text


# ---- 6. one run per out= -----------------------------------------------------------------------
def test_a_second_training_with_the_same_out_is_refused(runs_data, trainers, tmp_path):
    """While a training holds out=, another one with the same out= exits 2 at once, naming the
    folder and the holder's pid; once the holder is killed (-9), the next start proceeds."""
    out = tmp_path / "run"
    ready = tmp_path / "ready"
    overrides = _settings(runs_data, out)
    first = _Child(trainers, "hold", overrides, tmp_path / "first.log", RUNS_TEST_READY=str(ready))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None, first.stderr()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "lookcloser.cli", "train", "--no-progress", *overrides],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert str(out) in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    api.train(overrides=overrides, progress=False)  # the dead holder's lock is gone
    assert (out / "model.json").is_file()


# ---- 7. resume refuses changed data ------------------------------------------------------------
@pytest.fixture
def trained(runs_data, tmp_path):
    """A copy of the data and a run trained on it (with its checkpoint), and its overrides."""
    data = tmp_path / "data"
    shutil.copytree(runs_data, data)
    out = tmp_path / "run"
    overrides = _settings(data, out, "trainer.epochs=1")
    api.train(overrides=overrides, progress=False)
    return data, out, [*overrides, "trainer.resume=last"]


def _classes(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "train").iterdir())


def test_resume_refuses_a_renamed_class(trained):
    data, out, resume = trained
    old = _classes(data)[0]
    for split in ("train", "test"):
        (data / split / old).rename(data / split / "zz-renamed")
    with pytest.raises(ConfigError, match=rf"removed: {old}.*added: zz-renamed"):
        api.train(overrides=resume, progress=False)


def test_resume_refuses_an_added_class(trained):
    data, out, resume = trained
    for split in ("train", "test"):
        shutil.copytree(data / split / _classes(data)[0], data / split / "zz-new")
    with pytest.raises(ConfigError, match=r"added: zz-new.*training images: 24 before, 32 now"):
        api.train(overrides=resume, progress=False)


def test_resume_refuses_changed_training_images(trained):
    data, out, resume = trained
    first = sorted((data / "train" / _classes(data)[0]).iterdir())[0]
    first.rename(data / "train" / _classes(data)[1] / "moved.png")  # same count, other label
    with pytest.raises(ConfigError, match="training images changed .*24 before and now"):
        api.train(overrides=resume, progress=False)


def test_an_old_checkpoint_without_a_data_record_resumes_with_a_warning(trained, caplog):
    data, out, resume = trained
    path = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint.pop("lookcloser_data")  # as checkpoints before the record were
    torch.save(checkpoint, path)
    with caplog.at_level(logging.WARNING, logger="lookcloser"):
        api.train(overrides=resume, progress=False)
    assert "records no data fingerprint" in caplog.text


# ---- the old run a killed overwrite left aside -------------------------------------------------
def test_a_killed_overwrite_says_where_the_old_run_is(runs_data, tmp_path, caplog):
    from lookcloser.errors import ModelDirError
    from lookcloser.rundir import RunDir, backup_path

    out = tmp_path / "run"
    api.train(overrides=_settings(runs_data, out, "trainer.epochs=1"), progress=False)
    RunDir.plan(out, resume=None, overwrite=True).claim("seed: 1\n", [])  # then SIGKILL
    backup = backup_path(out)
    with pytest.raises(ModelDirError, match=rf"{backup}.*next train with out={out}"):
        api.load(out)  # what `lookcloser eval/predict RUN` read
    with caplog.at_level(logging.INFO, logger="lookcloser"):
        RunDir.plan(out, resume=None, overwrite=True)
    assert f"restored {out} from {backup}" in caplog.text
    assert (out / "model.json").is_file() and not backup.exists()
