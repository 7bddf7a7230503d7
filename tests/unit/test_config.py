"""Config: YAML + `key=value` overrides, type checks, helpful errors, method options."""

from __future__ import annotations

import pytest

from lookcloser.config import Config, method_options
from lookcloser.errors import ConfigError
from lookcloser.methods.baseline import BaselineOptions


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_win(tmp_path):
    """Values come from the YAML file, and overrides are applied on top of it."""
    path = _write(
        tmp_path,
        "data:\n  batch_size: 8\n  synthetic:\n    classes: 4\ntrainer:\n  epochs: 3\nseed: 7\n",
    )
    cfg = Config.load(path, ["trainer.epochs=5", "data.root=/some/where"])
    assert cfg.data.batch_size == 8
    assert cfg.data.synthetic.classes == 4
    assert cfg.seed == 7
    assert cfg.trainer.epochs == 5
    assert cfg.data.root == "/some/where"
    # Untouched keys keep their defaults.
    assert cfg.data.image_size == Config().data.image_size


def test_scalar_types_are_parsed_and_checked():
    """int, float, bool, str and null values are parsed from override text and converted."""
    cfg = Config.load(
        None,
        [
            "data.image_size=64",
            "optim.lr=0.5",
            "optim.weight_decay=0",
            "data.verify_images=false",
            "trainer.precision=16",
            "trainer.gradient_clip_val=null",
            "optim.layer_decay=0.75",
            "out=",
        ],
    )
    assert cfg.data.image_size == 64 and isinstance(cfg.data.image_size, int)
    assert cfg.optim.lr == 0.5
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.verify_images is False
    assert cfg.trainer.precision == "16"
    assert cfg.trainer.gradient_clip_val is None
    assert cfg.optim.layer_decay == 0.75
    assert cfg.out is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.image_size=big", "expected int"),
        ("data.image_size=1.5", "expected int"),
        ("data.image_size=true", "expected int"),
        ("data.verify_images=1", "expected bool"),
        ("optim.lr=fast", "expected float"),
        ("trainer.devices=true", "expected int or str"),
    ],
)
def test_wrong_types_are_rejected(override, expected):
    """A value of the wrong type is an error that names the key and the expected type."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=expected) as err:
        Config.load(None, [override])
    assert key in str(err.value)


def test_float_in_exponent_notation_is_accepted():
    """`optim.lr=1e-3` (as the README writes it) sets a float."""
    cfg = Config.load(None, ["optim.lr=1e-3", "optim.min_lr=5e-6"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.min_lr == pytest.approx(5e-6)


def test_literal_choices():
    """Literal keys accept only their listed values, and the error lists them."""
    assert Config.load(None, ["data.sampler=balanced"]).data.sampler == "balanced"
    with pytest.raises(ConfigError, match="'uniform' \\| 'balanced' \\| 'sqrt'"):
        Config.load(None, ["data.sampler=weighted"])


def test_tuple_key_from_list():
    """`data.train_scale=[a,b]` becomes a float tuple; the wrong length is rejected."""
    cfg = Config.load(None, ["data.train_scale=[0.3,1]"])
    assert cfg.data.train_scale == (0.3, 1.0)
    assert all(isinstance(v, float) for v in cfg.data.train_scale)
    with pytest.raises(ConfigError, match="a list of 2 numbers"):
        Config.load(None, ["data.train_scale=[0.5]"])
    with pytest.raises(ConfigError, match="data.train_scale"):
        Config.load(None, ["data.train_scale=[0.5,high]"])


def test_devices_int_or_auto():
    """`trainer.devices` takes a count or a string such as `auto`."""
    assert Config.load(None, ["trainer.devices=2"]).trainer.devices == 2
    assert Config.load(None, ["trainer.devices=auto"]).trainer.devices == "auto"


def test_unknown_key_suggests_closest():
    """A misspelled key is rejected and the closest valid key is suggested."""
    with pytest.raises(ConfigError, match="did you mean 'trainer.epochs'") as err:
        Config.load(None, ["trainer.epoch=3"])
    assert "override" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'data.batch_size'"):
        Config.load(None, ["data.batchsize=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    """An unknown key inside a YAML file is reported with the file's path."""
    path = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'") as err:
        Config.load(path)
    assert str(path) in str(err.value)


def test_sub_group_errors():
    """Groups cannot be set as values, and plain values have no sub-keys."""
    with pytest.raises(ConfigError, match="is a group of keys"):
        Config.load(None, ["data.synthetic=3"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        Config.load(None, ["data.root.path=x"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        Config.load(None, ["seed.value=1"])


def test_override_without_equals():
    """An override that is not key=value says how to write one."""
    with pytest.raises(ConfigError, match="expected key=value"):
        Config.load(None, ["trainer.epochs"])


def test_bad_yaml_names_the_file(tmp_path):
    """Unparseable YAML, a non-mapping top level and a missing file all name the file."""
    bad = _write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        Config.load(bad)
    assert str(bad) in str(err.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as err:
        Config.load(listing)
    assert str(listing) in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")


def test_method_options_stored_then_validated():
    """`method.*` values are stored as given and checked by the method's Options type."""
    cfg = Config.load(None, ["method.label_smoothing=0.2"])
    assert cfg.method == {"name": "baseline", "label_smoothing": 0.2}
    options = method_options(cfg, BaselineOptions)
    assert options == BaselineOptions(label_smoothing=0.2)
    # An int is accepted for a float option and converted.
    cfg = Config.load(None, ["method.label_smoothing=0"])
    value = method_options(cfg, BaselineOptions).label_smoothing
    assert value == 0.0 and isinstance(value, float)
    assert method_options(Config(), BaselineOptions) == BaselineOptions()


def test_method_option_wrong_type():
    """A method option of the wrong type is rejected when validated."""
    cfg = Config.load(None, ["method.label_smoothing=lots"])
    with pytest.raises(ConfigError, match="method.label_smoothing: expected float"):
        method_options(cfg, BaselineOptions)


def test_unknown_method_option_suggests():
    """An unknown method option names the method and suggests the closest option."""
    cfg = Config.load(None, ["method.label_smothing=0.2"])
    with pytest.raises(ConfigError, match="did you mean 'method.label_smoothing'") as err:
        method_options(cfg, BaselineOptions)
    assert "'baseline'" in str(err.value)


def test_method_options_must_be_one_level():
    """Nested method keys are rejected."""
    with pytest.raises(ConfigError, match="one level deep"):
        Config.load(None, ["method.a.b=1"])


def test_method_name_change_resets_options():
    """Choosing another method drops the previous method's options; the same name keeps them."""
    cfg = Config.load(None, ["method.label_smoothing=0.3", "method.name=baseline"])
    assert cfg.method == {"name": "baseline", "label_smoothing": 0.3}
    cfg.apply_overrides(["method.name=other"])
    assert cfg.method == {"name": "other"}


def test_yaml_method_options_after_name(tmp_path):
    """In YAML, options listed before `name` under `method:` are not lost."""
    path = _write(tmp_path, "method:\n  label_smoothing: 0.05\n  name: baseline\n")
    cfg = Config.load(path)
    assert cfg.method == {"name": "baseline", "label_smoothing": 0.05}


def test_to_yaml_round_trip(tmp_path):
    """Saving a config as YAML and loading it back gives an equal config."""
    cfg = Config.load(
        None,
        [
            "data.train_scale=[0.25,0.9]",
            "data.source=imagefolder",
            "data.root=/data/x",
            "data.synthetic.classes=5",
            "trainer.devices=2",
            "optim.lr=0.0003",
            "optim.min_lr=0.00001",
            "method.label_smoothing=0.2",
            "trainer.gradient_clip_val=1.5",
            "seed=3",
        ],
    )
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    again = Config.load(path)
    assert again == cfg
    assert again.data.train_scale == (0.25, 0.9)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_keys_lists_valid_dotted_keys():
    """`keys()` lists dotted keys of every group, without method options."""
    keys = Config().keys()
    assert "trainer.epochs" in keys
    assert "data.synthetic.classes" in keys
    assert not any(k.startswith("method.") for k in keys)


# ---- open mappings: model.kwargs and method.module ---------------------------------------
def test_model_kwargs_from_overrides_and_yaml(tmp_path):
    """`model.kwargs.<name>=value` entries (any YAML value) land in ModelConfig.kwargs."""
    cfg = Config.load(
        None,
        [
            "model.kwargs.img_size=448",
            "model.kwargs.dynamic_img_size=true",
            "model.kwargs.block_args={attn_layer: se}",
        ],
    )
    assert cfg.model.kwargs == {
        "img_size": 448,
        "dynamic_img_size": True,
        "block_args": {"attn_layer": "se"},
    }
    path = _write(tmp_path, "model:\n  kwargs:\n    output_stride: 16\n    block_args: {x: 1}\n")
    from_yaml = Config.load(path, ["model.kwargs.img_size=96"])
    assert from_yaml.model.kwargs == {"output_stride": 16, "block_args": {"x": 1}, "img_size": 96}
    assert Config().model.kwargs == {}


def test_model_kwargs_round_trip(tmp_path):
    """kwargs survive to_dict/from_dict and YAML, as model.json and config.yaml store them."""
    cfg = Config.load(None, ["model.kwargs.img_size=96", "model.kwargs.block_args={a: [1, 2]}"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and again.model.kwargs == {"img_size": 96, "block_args": {"a": [1, 2]}}
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.load(path) == cfg
    keys = cfg.keys()  # Config's dotted keys (not a dict)
    assert "model.kwargs.*" in keys and "model.kwargs.img_size" not in keys


def test_model_kwargs_errors():
    """Entries are one level deep; a whole mapping must be a mapping."""
    with pytest.raises(ConfigError, match=r"model.kwargs entries are one level deep"):
        Config.load(None, ["model.kwargs.block_args.attn_layer=se"])
    with pytest.raises(ConfigError, match=r"model.kwargs: expected a mapping, got 3"):
        Config.load(None, ["model.kwargs=3"])
    cfg = Config.load(None, ["model.kwargs={img_size: 64}"])
    assert cfg.model.kwargs == {"img_size": 64}


def test_method_module_survives_a_name_change():
    """`method.module` is where methods come from, so choosing a method keeps it."""
    cfg = Config.load(None, ["method.module=my_methods", "method.name=mine", "method.x=1"])
    assert cfg.method == {"name": "mine", "module": "my_methods", "x": 1}
    assert method_options(Config.load(None, ["method.module=m"]), BaselineOptions) == (
        BaselineOptions()
    )
