"""A run killed mid-epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from flowkit import TINY
from safetensors.torch import load_file

from lookcloser import api


class Crash(L.Callback):
    """Dies after a given optimizer step, before that step's checkpoint is written."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def settings(root, out) -> list[str]:
    # 48 images / batch 8 = 6 steps an epoch, 2 epochs; checkpoints every 4 steps, so the
    # last checkpoint before the crash (step 8) is in the middle of the second epoch.
    return [
        *TINY,
        "data.source=imagefolder",
        f"data.root={root}",
        "trainer.epochs=2",
        "trainer.deterministic=true",
        "trainer.checkpoint_every_n_steps=4",
        "model.drop_rate=0.2",  # randomness in the model too, not only in the data
        "data.hflip=0.5",
        f"out={out}",
    ]


def test_resume_mid_epoch_matches_uninterrupted_run(synthetic_root, tmp_path):
    full = api.train(overrides=settings(synthetic_root, tmp_path / "full"), progress=False)

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.train(
            overrides=settings(synthetic_root, crashed),
            progress=False,
            callbacks=[Crash(at_step=10)],
        )
    assert not (crashed / "model.json").exists()  # a crash never looks like a finished model
    assert (crashed / "checkpoints" / "last.ckpt").is_file()

    resumed = api.train(
        overrides=[*settings(synthetic_root, crashed), "trainer.resume=last"], progress=False
    )

    assert json.loads((crashed / "model.json").read_text())["training"]["global_step"] == 12
    for key in ["top1", "mean_per_class_accuracy", "ece"]:
        assert resumed.metrics[key] == full.metrics[key], key
    a = load_file(str(full.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_unfinished_run_is_not_silently_restarted(synthetic_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        api.train(
            overrides=settings(synthetic_root, out), progress=False, callbacks=[Crash(at_step=5)]
        )
    from lookcloser.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.resume=last"):
        api.train(overrides=settings(synthetic_root, out), progress=False)
