"""Red team: a model directory is untrusted input.

Loading one (Predictor.load, api.load, and so every command that takes a model or ensemble
directory) must never import a module it names, never read a file outside it, never let a
tampered number drive memory, and answer anything tampered with a ModelDirError naming
model.json (or the file) and the key.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import struct
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import save_tiny_model

from lookcloser import api, cli
from lookcloser.config import Config
from lookcloser.errors import LookcloserError, ModelDirError
from lookcloser.modeldir import file_sha256
from lookcloser.predictor import Predictor

CLASSES = ["alpha", "beta", "gamma"]
SIZE = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny untrained Baseline saved as a model directory (as training saves it)."""
    run_dir = tmp_path_factory.mktemp("trust") / "model"
    return save_tiny_model(run_dir, CLASSES, SIZE, spread=False, metrics={"test": {"top1": 0.5}})


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model directory, free to tamper with."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _record(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def _write(model_dir: Path, record: dict) -> None:
    (model_dir / "model.json").write_text(json.dumps(record))


def _tamper(model_dir: Path, dotted: str, value) -> None:
    """Set one dotted key of model.json (creating mappings on the way)."""
    record = _record(model_dir)
    node = record
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    _write(model_dir, record)


def _image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "img.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    return path


def _evil_module(folder: Path) -> tuple[str, Path]:
    """A module file in `folder` that leaves a marker file when imported."""
    name = f"evil_{uuid.uuid4().hex[:10]}"
    marker = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    )
    return name, marker


# ---- 1. a model directory never imports code ---------------------------------------------------
def test_method_module_this_is_refused_by_predict(model, tmp_path, capsys):
    """`method.module: this` would print the Zen of Python: refused, naming the key."""
    _tamper(model, "config.method.module", "this")
    sys.modules.pop("this", None)
    code = cli.main(["predict", str(model), str(_image(tmp_path / "imgs"))])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Beautiful is better" not in out + err
    assert "this" not in sys.modules
    assert "model.json" in err and "config.method.module" in err and "--trust-module" in err


@pytest.mark.parametrize("how", ["api", "predictor", "ensemble"])
def test_module_beside_the_notebook_never_runs(model, tmp_path, monkeypatch, how):
    """A module file in the current folder (on sys.path in notebooks) named by model.json
    is never imported by any loader."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    name, marker = _evil_module(cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    _tamper(model, "config.method.module", name)
    target = model
    if how == "ensemble":
        target = _ensemble_of(model, tmp_path / "ens")
    with pytest.raises(ModelDirError) as caught:
        if how == "predictor":
            Predictor.load(target)
        else:
            api.load(target)
    assert not marker.exists()
    assert name not in sys.modules
    message = str(caught.value)
    assert "model.json" in message and "config.method.module" in message
    assert "trust_modules" in message or "--trust-module" in message


def test_trust_module_opts_in(model, tmp_path, monkeypatch, capsys):
    """The user's explicit opt-in imports the named module (and only then)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    name, marker = _evil_module(cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    _tamper(model, "config.method.module", name)
    with pytest.raises(ModelDirError):
        api.load(model, trust_modules=("some_other_module",))
    assert not marker.exists()
    predictor = api.load(model, trust_modules=(name,))
    assert marker.exists() and predictor.classes == CLASSES
    marker.unlink()
    sys.modules.pop(name, None)
    image = _image(tmp_path / "imgs")
    assert cli.main(["predict", str(model), str(image), "--trust-module", name]) == 0
    assert marker.exists()
    assert "alpha" in capsys.readouterr().out  # the predictions table names the classes
    ensemble = _ensemble_of(model, tmp_path / "ens")
    assert len(api.load(ensemble, trust_modules=(name,)).members) == 1


def test_every_loading_command_takes_trust_module():
    """--trust-module is on every command that loads a model directory."""
    parser = cli.build_parser()
    for argv in (
        ["eval", "M"],
        ["predict", "M", "x.png"],
        ["explain", "M", "x.png"],
        ["export", "M"],
        ["serve", "M"],
        ["compare", "R", "--out", "O"],
        ["ensemble", "fit", "M", "--out", "O"],
    ):
        args = parser.parse_args([*argv, "--trust-module", "a", "--trust-module", "b"])
        assert args.trust_module == ["a", "b"], argv


def test_training_with_the_users_own_module_still_works(tmp_path, monkeypatch):
    """method.module in the user's own config is imported for training (their own code)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    name, marker = _evil_module(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    cfg = api.check_config(
        api.as_config(None, ["model.backbone=test_efficientnet", f"method.module={name}"])
    )
    assert marker.exists() and cfg.method["module"] == name


def test_backbone_name_with_a_source_prefix_is_never_read(model, tmp_path):
    """timm's `local-dir:` / `hf-hub:` names would read a folder or the network: refused."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    for name in (f"local-dir:{folder}", "hf-hub:someone/something"):
        _tamper(model, "config.model.backbone", name)
        with pytest.raises(ModelDirError, match="model.backbone"):
            Predictor.load(model)


# ---- 2. every value range-checked -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("config.data.image_size", 0, "data.image_size: expected a value in [16, 4096]"),
        ("config.data.image_size", 100000, "data.image_size: expected a value in [16, 4096]"),
        ("config.data.image_size", "64", "data.image_size: expected int"),
        ("config.data.crop_pct", 3.0, "data.crop_pct: expected a value in [0.25, 1]"),
        ("config.data.bogus", 1, "unknown key 'data.bogus'"),
        ("config.trainer.epochs", -1, "trainer.epochs: expected a value >= 1"),
        ("config.model.drop_rate", "lots", "model.drop_rate: expected float"),
        ("config.method.label_smoothing", 7, "method.label_smoothing"),
        ("method_options.label_smoothing", "x", "method.label_smoothing"),
        ("method_options.no_such_option", 1, "method.no_such_option"),
        ("config.model.head", "no_such_head", "model.head"),
        # timm would expand this into a billion blocks before building anything.
        ("config.model.kwargs.depth_multiplier", 1e9, "model.kwargs.depth_multiplier"),
        # Within that bound, but a model far larger than its weights: stopped while building.
        ("config.model.kwargs.depth_multiplier", 1000.0, "cannot be built"),
        ("config.model.kwargs.channel_multiplier", 1000.0, "do not fit"),
    ],
)
def test_config_values_are_checked_like_config_files(model, key, value, expected):
    """model.json's config is checked as `lookcloser train` checks a config, and the
    message names model.json and the key."""
    _tamper(model, key, value)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    message = str(caught.value)
    assert message.startswith(str(model / "model.json")), message
    assert expected in message


def test_same_message_as_a_config_file(model, tmp_path):
    """The text after the model.json path is what a config file with that value gets."""
    _tamper(model, "config.data.image_size", 5)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  image_size: 5\n")
    with pytest.raises(LookcloserError) as from_file:
        Config.load(config_file)
    assert str(caught.value).split(": ", 1)[1] == str(from_file.value).split(": ", 1)[1]


def test_config_has_an_upper_bound_on_image_size():
    with pytest.raises(LookcloserError, match="data.image_size"):
        Config.load(None, ["data.image_size=100000"])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("preprocessing.image_size", 0, "preprocessing.image_size"),
        ("preprocessing.image_size", -5, "preprocessing.image_size"),
        ("preprocessing.image_size", "64", "preprocessing.image_size"),
        ("preprocessing.image_size", 100000, "preprocessing.image_size"),
        ("preprocessing.image_size", True, "preprocessing.image_size"),
        ("preprocessing.image_size", 64.5, "preprocessing.image_size"),
        ("preprocessing.crop_pct", 0, "preprocessing.crop_pct"),
        ("preprocessing.crop_pct", 1e-9, "preprocessing.crop_pct"),
        ("preprocessing.crop_pct", "x", "preprocessing.crop_pct"),
        ("preprocessing.crop_pct", float("nan"), "preprocessing.crop_pct"),
        ("preprocessing.interpolation", "evil", "preprocessing.interpolation"),
        ("preprocessing.interpolation", 3, "preprocessing.interpolation"),
        ("preprocessing.mean", "x", "preprocessing.mean"),
        ("preprocessing", [], "preprocessing"),
        ("classes", ["a", "a", "b"], "classes"),
        ("classes", ["a", 2, "b"], "classes"),
        ("classes", "abc", "classes"),
        ("classes", [], "classes"),
        ("classes", ["a", "b"], "classes"),  # 2 names, 3 outputs in the weights
        ("classes", [f"c{i}" for i in range(100000)], "classes"),  # a huge head, never built
        ("tta", "scales=64+100000", "tta"),
        ("tta", "scales=" + "+".join(["32"] * 1000), "tta"),
        ("tta", 5, "tta"),
        ("tta", "rm -rf", "tta"),
        ("format_version", "1", "format_version"),
        ("format_version", None, "format_version"),
        ("format", None, "format"),
        ("method", 5, "method"),
        ("method", "no_such_method", "method"),
        ("method_options", [], "method_options"),
        ("meta_keys", "lat", "meta_keys"),
        ("meta_keys", ["latitude", "id"], "meta_keys"),
        ("config", "yes", "config"),
        ("weights", "model.safetensors", "weights"),
        ("weights.file", 5, "weights.file"),
        ("weights.sha256", 5, "weights.sha256"),
        ("weights.bytes", "12", "weights.bytes"),
        ("weights.bytes", 12, "weights.bytes"),
    ],
)
def test_tampered_values_are_refused(model, key, value, expected):
    """Tampered fields outside the config get a ModelDirError naming the field, never a raw
    ValueError / TypeError / KeyError (or an out-of-memory)."""
    _tamper(model, key, value)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    assert "model.json" in str(caught.value) and expected in str(caught.value)


@pytest.mark.parametrize("drop", ["preprocessing.image_size", "weights.sha256", "classes"])
def test_missing_fields_are_named(model, drop):
    record = _record(model)
    *parents, last = drop.split(".")
    node = record
    for part in parents:
        node = node[part]
    del node[last]
    _write(model, record)
    with pytest.raises(ModelDirError, match=last):
        Predictor.load(model)


def test_top_level_that_is_not_a_mapping(model):
    (model / "model.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelDirError, match="model.json"):
        Predictor.load(model)


def test_tta_option_refuses_huge_scales(model):
    """The --tta option is held to the same bound as model.json's."""
    with pytest.raises(LookcloserError, match="4096"):
        Predictor.load(model, tta="scales=64+100000")


# ---- 3. files stay inside the directory ------------------------------------------------------------
@pytest.mark.parametrize(
    "file", ["../model.safetensors", "/etc/hostname", "sub/model.safetensors", "..", "", "."]
)
def test_weights_file_may_not_leave_the_directory(model, file):
    _tamper(model, "weights.file", file)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    assert "model.json: weights.file: expected a file name inside" in str(caught.value)


def test_weights_symlink_leaving_the_directory_is_refused(model, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(model / "model.safetensors", outside)
    (model / "model.safetensors").symlink_to(outside)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    assert "model.json: weights.file:" in str(caught.value) and "leads outside" in str(caught.value)


def _replace_weights(model_dir: Path, data: bytes) -> Path:
    """New weight bytes, with model.json's SHA-256 and size made to match (a full forgery)."""
    weights = model_dir / "model.safetensors"
    weights.write_bytes(data)
    record = _record(model_dir)
    record["weights"]["sha256"] = file_sha256(weights)
    record["weights"]["bytes"] = len(data)
    _write(model_dir, record)
    return weights


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 2**62) + b"{}",  # a header claiming 2^62 bytes
        struct.pack("<Q", 10) + b"not json!!",  # a header safetensors rejects
        struct.pack("<Q", 2) + b"[]",  # JSON, but not a safetensors header
        b"\x01\x02",  # shorter than the length field
        b"",
    ],
)
def test_bad_safetensors_header_names_the_file(model, data):
    weights = _replace_weights(model, data)
    with pytest.raises(ModelDirError) as caught:
        Predictor.load(model)
    assert str(weights) in str(caught.value)


def test_weights_with_other_shapes_are_refused(model):
    """Weights whose tensors do not fit the recorded model: a ModelDirError naming the tensor
    and both shapes."""
    from safetensors.torch import load_file, save

    tensors = load_file(str(model / "model.safetensors"))
    key = "backbone.model.conv_stem.weight"
    tensors[key] = torch.zeros(8, 3, 3, 3)
    _replace_weights(model, save(tensors))
    with pytest.raises(ModelDirError, match="do not fit") as caught:
        Predictor.load(model)
    assert f"{key} is (8, 3, 3, 3) in the weights file" in str(caught.value)


def _ensemble_of(model_dir: Path, out: Path, member_path: str | None = None) -> Path:
    """An ensemble directory with `model_dir` copied in as its one member (as fit writes it)."""
    member = out / "members" / "0-model"
    shutil.copytree(model_dir, member)
    record = {
        "format": "lookcloser.ensemble",
        "format_version": 1,
        "members": [{"name": "0-model", "path": member_path or "members/0-model"}],
        "weights": [1.0],
        "classes": CLASSES,
    }
    (out / "ensemble.json").write_text(json.dumps(record))
    return out


def test_ensemble_loads(model, tmp_path):
    assert len(api.load(_ensemble_of(model, tmp_path / "ens")).members) == 1


@pytest.mark.parametrize("where", ["outside", "dotdot", "absolute", "symlink"])
def test_ensemble_member_may_not_leave_the_ensemble(model, tmp_path, where):
    ens = tmp_path / "ens"
    if where == "symlink":
        out = _ensemble_of(model, ens, "members/link")
        (out / "members" / "link").symlink_to(model, target_is_directory=True)
    elif where == "absolute":
        out = _ensemble_of(model, ens, str(model))
    elif where == "dotdot":
        out = _ensemble_of(model, ens, "../model")
    else:
        out = _ensemble_of(model, ens, "members/../../model")
    with pytest.raises(ModelDirError, match="ensemble.json"):
        api.load(out)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weights", ["1"]),
        ("weights", [1.0, 1.0]),
        ("weights", [-1.0]),
        ("weights", "1"),
        ("members", "x"),
        ("members", [{"path": 5, "name": "a"}]),
        ("members", [{"name": "a"}]),
        ("format_version", "1"),
        ("tta", "scales=64+100000"),
    ],
)
def test_tampered_ensemble_json_is_refused(model, tmp_path, key, value):
    out = _ensemble_of(model, tmp_path / "ens")
    record = json.loads((out / "ensemble.json").read_text())
    record[key] = value
    (out / "ensemble.json").write_text(json.dumps(record))
    with pytest.raises(ModelDirError, match="ensemble.json"):
        api.load(out)


# ---- 4. weights come only from model.safetensors ---------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("checkpoint_path", "WEIGHTS"),
        ("pretrained_cfg_overlay", {"file": "WEIGHTS"}),
        ("pretrained_cfg", {"file": "WEIGHTS"}),
        ("cache_dir", "ELSEWHERE"),
    ],
)
def test_timm_file_arguments_are_refused(model, tmp_path, key, value):
    """model.kwargs that make timm read a file are refused when loading a model directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    text = json.dumps(value).replace("WEIGHTS", str(model / "model.safetensors"))
    text = text.replace("ELSEWHERE", str(elsewhere))
    _tamper(model, f"config.model.kwargs.{key}", json.loads(text))
    with pytest.raises(ModelDirError, match=f"model.kwargs.{key}"):
        Predictor.load(model)


def test_loading_never_reads_model_weights_or_downloads(model, tmp_path, monkeypatch):
    """model.weights and model.pretrained are training's: a model directory's weights are
    its model.safetensors only."""
    import timm.models._builder as builder

    from lookcloser.models import backbones

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained weight source was read")

    monkeypatch.setattr(backbones, "read_state_dict", refuse)
    monkeypatch.setattr(backbones, "offline_weights_path", refuse)
    monkeypatch.setattr(builder, "load_pretrained", refuse)
    record = _record(model)
    record["config"]["model"]["pretrained"] = True
    record["config"]["model"]["weights"] = str(tmp_path / "secret.pt")
    _write(model, record)
    assert Predictor.load(model).classes == CLASSES


# ---- 5. data paths stored resolved -----------------------------------------------------------------
def test_data_root_is_stored_resolved(tmp_path, monkeypatch):
    """A run trained on a relative data.root evaluates the same data from another folder."""
    from lookcloser.data.synthetic import generate

    work = tmp_path / "work"
    generate(work / "d4", classes=2, per_class=4, test_per_class=3, size=32, seed=1)
    other = tmp_path / "other"
    generate(other / "d4", classes=2, per_class=4, test_per_class=1, size=32, seed=2)
    monkeypatch.chdir(work)
    result = api.train(
        None,
        [
            "data.source=imagefolder",
            "data.root=d4",
            "data.num_workers=0",
            "data.image_size=32",
            "data.batch_size=4",
            "data.crop_pct=1.0",
            "data.val_fraction=0",
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            "trainer.epochs=1",
            "trainer.progress=none",
            "out=run",
        ],
        progress=False,
    )
    run = (work / result.run_dir).resolve()
    record = _record(run)
    assert record["config"]["data"]["root"] == str((work / "d4").resolve())
    assert record["data"]["root"] == str((work / "d4").resolve())
    assert f"root: {(work / 'd4').resolve()}" in (run / "config.yaml").read_text()
    monkeypatch.chdir(other)
    assert api.evaluate(run, progress=False)["images"] == 6  # work/d4's test split, not other's


# ---- 6. fuzzing model.json -------------------------------------------------------------------------
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)

FIELDS = [
    "format",
    "format_version",
    "method",
    "method_options",
    "method_options.label_smoothing",
    "classes",
    "num_classes",
    "meta_keys",
    "tta",
    "preprocessing",
    "preprocessing.image_size",
    "preprocessing.crop_pct",
    "preprocessing.interpolation",
    "preprocessing.mean",
    "weights",
    "weights.file",
    "weights.sha256",
    "weights.bytes",
    "config",
    "config.seed",
    "config.method",
    "config.method.name",
    "config.method.module",
    "config.data.image_size",
    "config.data.max_image_pixels",
    "config.data.meta_keys",
    "config.model",
    "config.model.backbone",
    "config.model.kwargs",
    "config.model.head",
    "config.model.head_subcenters",
    "config.model.attention",
    "config.model.stn",
    "config.optim.stages",
]

INTERESTING = st.sampled_from(
    [0, -5, 1, 10**9, 2**62, "64", "", "this", "../x", "/etc/passwd", [], {}, None, True, 1e308]
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(FIELDS), st.one_of(INTERESTING, JUNK)), min_size=1, max_size=3
    )
)
def test_fuzzed_model_json_gives_only_named_errors(tiny_model, tmp_path_factory, changes):
    """Mutated model.json values: loading succeeds or raises a LookcloserError, never a raw
    exception, and never holds the process for long."""
    model_dir = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("fuzz") / "m"))
    record = _record(model_dir)
    for dotted, value in changes:
        node = record
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    _write(model_dir, record)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with contextlib.suppress(LookcloserError):  # anything else fails the test
        Predictor.load(model_dir)
    assert time.monotonic() - start < 20
    # ru_maxrss is in KiB on Linux: no tampered value may grow the process by 1 GiB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20
    shutil.rmtree(model_dir.parent)
