"""Runs killed with SIGKILL at any point resume with `trainer.resume=last` and end with the
uninterrupted run's exact weights (same seed, same data order): mid-epoch, on an epoch's last
batch, between epochs, and during the final evaluation."""

from __future__ import annotations

import json
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

# A child process that trains and kills itself (SIGKILL: no cleanup, no exception handlers) at
# a chosen point. Lightning runs checkpoint callbacks after all others, so a kill in
# `on_train_epoch_end` lands after the last batch's step checkpoint and before the epoch's.
KILLED_RUN = """
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
    Predictor.run_samples = lambda *args, **kwargs: die()

api.train(overrides=sys.argv[3:], progress=False, callbacks=[Kill()])
"""


def settings(root, out) -> list[str]:
    # 48 images / batch 12 = 4 steps an epoch, 2 epochs; a step checkpoint every 2 steps, so
    # one falls on an epoch's last batch (step 4) and one in mid-epoch (step 6).
    return [
        *TINY,
        "data.source=imagefolder",
        f"data.root={root}",
        "data.batch_size=12",
        "trainer.epochs=2",
        "trainer.deterministic=true",
        "trainer.checkpoint_every_n_steps=2",
        "model.drop_rate=0.2",  # randomness in the model too, not only in the data
        "data.hflip=0.5",
        f"out={out}",
    ]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return api.train(overrides=settings(synthetic_root, out), progress=False)


@pytest.mark.parametrize(
    "where, at, checkpoint_step",
    [
        ("mid-epoch", 7, 6),  # killed before step 8; last checkpoint: step 6, mid epoch 2
        ("last-batch", 0, 4),  # killed after epoch 1's last batch, before its epoch-end save
        ("between-epochs", 1, 4),  # killed as epoch 2 starts; last save: epoch 1's end
        ("evaluation", 0, 8),  # killed during the final evaluation, after all training
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    where, at, checkpoint_step, synthetic_root, uninterrupted, tmp_path
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
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == checkpoint_step

    resumed = api.train(overrides=[*overrides, "trainer.resume=last"], progress=False)

    record = json.loads((out / "model.json").read_text())
    assert record["training"]["global_step"] == 8  # 2 epochs x 4 steps, none skipped or repeated
    assert resumed.metrics["top1"] == uninterrupted.metrics["top1"]
    a = load_file(str(uninterrupted.run_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # bit-identical: same seed, same batches, deterministic CPU kernels
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


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
