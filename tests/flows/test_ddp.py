"""Two-process DDP on the CPU (gloo), launched by Lightning from the real CLI."""

from __future__ import annotations

import json

from flowkit import TINY, run_cli


def test_two_process_cpu_ddp_trains_and_saves_once(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    result = run_cli(
        "train",
        "--no-progress",
        "data.source=imagefolder",
        f"data.root={synthetic_root}",
        *TINY,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"out={out}",
    )
    assert result.stdout.strip().splitlines()[-1] == str(out)  # printed once, by rank 0
    record = json.loads((out / "model.json").read_text())
    assert record["training"]["world_size"] == 2
    # 48 images less 6 carved for validation: 21 per rank, batch 8 -> 2 whole batches.
    assert record["data"]["train_images"] == 42
    assert record["training"]["global_step"] == 2
    assert json.loads((out / "metrics.json").read_text())["test"]["images"] == 12
    # The saved model works in a fresh process.
    predictions = json.loads(
        run_cli("predict", str(out), str(synthetic_root / "test"), "--format", "json").stdout
    )
    assert len(predictions) == 12
