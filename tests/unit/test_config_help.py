"""`lookcloser config`: every key documented, and the output is a config that reads back."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lookcloser import cli
from lookcloser.config import Config, _leaves
from lookcloser.config_help import HELP, describe
from lookcloser.methods import _import_builtin_methods
from lookcloser.methods.base import METHODS


def test_every_key_and_every_builtin_method_option_has_a_meaning():
    keys = {key for key, _, _ in _leaves(Config()) if key != "method"}
    assert keys - set(HELP) == set()
    _import_builtin_methods()
    for name, cls in METHODS.items():
        if not cls.__module__.startswith("lookcloser."):
            continue
        options = {f.name for f in dataclasses.fields(cls.Options)}
        assert options - set(getattr(cls.Options, "HELP", {})) == set(), name


@pytest.mark.parametrize("method", ["baseline", "dcl"])
def test_output_reads_back_as_the_same_config(method, tmp_path):
    cfg = Config.load(
        None,
        [
            f"method.name={method}",
            "data.image_size=96",
            "data.train_scale=[0.6, 1.0]",
            "model.kwargs.drop_block_rate=0.1",
            "trainer.cpu_threads=1",
        ],
    )
    options = METHODS[method].Options
    text = describe(cfg, options)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    again = Config.load(path)
    expected = cfg.to_dict()
    expected["method"] = {"name": method, **dataclasses.asdict(options())}
    assert again.to_dict() == expected
    assert "image_size: 96  # input side in pixels (int; in [16, 4096]; default 224)" in text
    assert yaml.safe_load(text)["model"]["kwargs"] == {"drop_block_rate": 0.1}


def test_cli_config_prints_the_resolved_tree(capsys):
    assert cli.main(["config", "--method", "dcl", "method.regions=4"]) == 0
    out = capsys.readouterr().out
    assert "  regions: 4  # N: images are cut into N x N regions" in out
    assert "(int; default 7)" in out
    assert cli.main(["config", "data.batch_size=0"]) == 2
    assert "data.batch_size: expected a value >= 1, got 0" in capsys.readouterr().err
