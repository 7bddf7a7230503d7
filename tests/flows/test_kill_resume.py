"""Runs killed with SIGKILL at any point resume with `trainer.resume=last` and end with the
uninterrupted run's exact weights (same seed, same data order): mid-epoch, on an epoch's last
batch, between epochs, between an epoch's two saves (best.ckpt, then last.ckpt), and during
the final evaluation; with validation on a carved val split, and mid-epoch with an
unlabelled stream that the method learns from."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from flowkit import SRC, TINY
from safetensors.torch import load_file

from lookcloser import api
from lookcloser.errors import ConfigError

# A method whose loss depends on the unlabelled images (entropy of its predictions on them),
# so weights differ unless the resumed run sees the same unlabelled batches. Defined once as
# text: the killed child process registers it too.
UNLABELLED_METHOD = """
import torch
from lookcloser.methods.base import register_method
from lookcloser.methods.baseline import Baseline

@register_method
class UnlabelledEntropy(Baseline):
    name = "test-unlabelled-entropy"

    def training_losses(self, batch):
        losses = super().training_losses(batch)
        probs = self(batch.unlabelled).softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
        return {**losses, "loss": losses["loss"] + 0.5 * entropy, "entropy": entropy}
"""
exec(UNLABELLED_METHOD)

# A child process that trains and kills itself (SIGKILL: no cleanup, no exception handlers) at
# a chosen point. Lightning runs checkpoint callbacks after all others, so a kill in
# `on_train_epoch_end` lands before the epoch's end-of-epoch save.
KILLED_RUN = (
    UNLABELLED_METHOD
    + """
import os, signal, sys
import lightning as L
from lookcloser import api

where, at = sys.argv[1], int(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if where == "mid-epoch" and trainer.global_step == at:
            die()

    def on_train_epoch_end(self, trainer, pl_module):
        if where == "last-batch" and trainer.current_epoch == at:
            die()

    def on_train_epoch_start(self, trainer, pl_module):
        if where == "between-epochs" and trainer.current_epoch == at:
            die()

if where == "evaluation":
    from lookcloser.predictor import Predictor
    Predictor.stream_samples = lambda *args, **kwargs: die()

if where == "between-saves":  # after epoch `at`'s best.ckpt, before its last.ckpt
    save = L.Trainer.save_checkpoint
    def save_checkpoint(self, filepath, *args, **kwargs):
        save(self, filepath, *args, **kwargs)
        if str(filepath).endswith("best.ckpt") and self.current_epoch == at:
            die()
    L.Trainer.save_checkpoint = save_checkpoint

api.train(overrides=sys.argv[3:], progress=False, callbacks=[Kill()])
"""
)


def settings(root, out, *extra: str) -> list[str]:
    # 48 images, 12 of them carved for validation (run after every epoch); 36 / batch 9 = 4
    # steps an epoch, 2 epochs; a step checkpoint every 2 steps: in mid-epoch (steps 2 and 6),
    # none on an epoch's last batch (step 4: the epoch-end save follows; Lightning resumes a
    # checkpoint taken on the last batch inside its epoch, and after a second restart trains
    # one batch too many).
    return [
        *TINY,
        "data.source=imagefolder",
        f"data.root={root}",
        "data.val_fraction=0.25",
        "trainer.val_every_n_epochs=1",
        "data.batch_size=9",
        "trainer.epochs=2",
        "trainer.deterministic=true",
        "trainer.checkpoint_every_n_steps=2",
        "model.drop_rate=0.2",  # randomness in the model too, not only in the data
        "data.hflip=0.5",
        f"out={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return api.train(overrides=settings(synthetic_root, out), progress=False)


@pytest.fixture(scope="module")
def unlabelled_folder(tmp_path_factory):
    """10 other synthetic images, in sub-folders that are not classes."""
    from lookcloser.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("unlabelled"), 2, 4, 1, 48, seed=7)


def with_unlabelled(folder) -> list[str]:
    return [
        f"data.unlabelled={folder}",
        "data.unlabelled_batch_size=4",
        "method.name=test-unlabelled-entropy",
    ]


@pytest.mark.parametrize(
    "where, at, checkpoint_step",
    [
        ("mid-epoch", 7, 6),  # killed before step 8; last checkpoint: step 6, mid epoch 2
        # killed after epoch 1's last batch, before its epoch-end save: from step 2
        ("last-batch", 0, 2),
        ("between-epochs", 1, 4),  # killed as epoch 2 starts; last save: epoch 1's end
        ("evaluation", 0, 8),  # killed during the final evaluation, after all training
        # Killed between epoch 1's two saves: last.ckpt is still step 2's, best.ckpt the
        # epoch's end (step 4), the newer one (resumed from).
        ("between-saves", 0, 2),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    where, at, checkpoint_step, synthetic_root, uninterrupted, tmp_path, caplog
):
    out = tmp_path / "run"
    overrides = settings(synthetic_root, out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, where, str(at), *overrides],
        env={**_env(), "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "model.json").exists()  # a killed run never looks finished
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == checkpoint_step

    with caplog.at_level(logging.WARNING, logger="lookcloser"):
        resumed = api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)
    newest = "best.ckpt" if where == "between-saves" else "last.ckpt"
    assert f"continuing from {out / 'checkpoints' / newest}" in caplog.text

    _same_run(resumed, uninterrupted, out)


def _same_run(resumed, uninterrupted, out) -> None:
    record = json.loads((out / "model.json").read_text())
    assert record["training"]["global_step"] == 8  # 2 epochs x 4 steps, none skipped or repeated
    assert record["data"]["val_images"] == 12 and record["data"]["train_images"] == 36
    assert resumed.metrics == uninterrupted.metrics  # val and test figures alike
    a = load_file(str(uninterrupted.run_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # bit-identical: same seed, same batches, deterministic CPU kernels
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_killed_run_with_an_unlabelled_stream_resumes_exactly(
    synthetic_root, unlabelled_folder, uninterrupted, tmp_path
):
    extra = with_unlabelled(unlabelled_folder)
    full = api.train(overrides=settings(synthetic_root, tmp_path / "full", *extra), progress=False)
    out = tmp_path / "run"
    overrides = settings(synthetic_root, out, *extra)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, "mid-epoch", "7", *overrides],
        env={**_env(), "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)
    _same_run(resumed, full, out)
    assert json.loads((out / "model.json").read_text())["data"]["unlabelled_images"] == 10
    # The stream mattered: the same run without its entropy term ends elsewhere.
    plain = load_file(str(uninterrupted.run_dir / "model.safetensors"))
    learned = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(plain[k], learned[k]) for k in plain)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_unfinished_run_is_not_silently_restarted(synthetic_root, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, "mid-epoch", "3", *settings(synthetic_root, out)],
        env={**_env(), "PYTHONPATH": str(SRC)},
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(ConfigError, match="trainer.resume=last"):
        api.train(overrides=settings(synthetic_root, out), progress=False)
    assert (out / "checkpoints" / "last.ckpt").is_file()  # the checkpoint at step 2 is kept
