"""The synthetic benchmark: deterministic, cached safely, and classes that differ only in parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookcloser.config import DataConfig, SyntheticConfig
from lookcloser.data import synthetic
from lookcloser.data.sources import build_source
from lookcloser.data.synthetic import (
    MARKS,
    MAX_CLASSES,
    SLOTS,
    class_names,
    class_parts,
    generate,
    render,
)
from lookcloser.errors import DataError

SMALL = dict(classes=3, per_class=3, test_per_class=2, size=48)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png")) if p.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _differing(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def test_layout_counts_and_metadata(tmp_path):
    out = generate(tmp_path / "s", **SMALL, seed=0)
    names = class_names(3)
    assert sorted(p.name for p in (out / "train").iterdir()) == names
    assert sorted(p.name for p in (out / "test").iterdir()) == names
    for name in names:
        assert sorted(p.name for p in (out / "train" / name).iterdir()) == [
            "0000.png",
            "0001.png",
            "0002.png",
        ]
        assert len(list((out / "test" / name).iterdir())) == 2
    with Image.open(out / "train" / names[0] / "0000.png") as image:
        assert image.mode == "RGB" and image.size == (48, 48)
    meta = json.loads((out / "synthetic.json").read_text())
    assert {k: meta[k] for k in SMALL} == SMALL and meta["seed"] == 0


def test_deterministic_from_seed(tmp_path):
    a = _tree(generate(tmp_path / "a", **SMALL, seed=0))
    b = _tree(generate(tmp_path / "b", **SMALL, seed=0))
    c = _tree(generate(tmp_path / "c", **SMALL, seed=1))
    assert a == b and len(a) == 15
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)  # every image changes with the seed
    # train and test never share a random stream
    assert len(set(a.values())) == len(a)


def test_class_names_and_parts():
    names = class_names(MAX_CLASSES)
    assert MAX_CLASSES == len(MARKS) ** len(SLOTS) == 125
    assert len(set(names)) == MAX_CLASSES and sorted(names) == names
    assert names[0].startswith("c000_") and class_names(8)[7].startswith("c07_")
    assert len({class_parts(i) for i in range(MAX_CLASSES)}) == MAX_CLASSES
    assert class_names(8)[3].endswith("_" + "-".join(class_parts(3)))
    # Fine-grained order: consecutive classes differ in exactly one part...
    steps = [_differing(class_parts(i), class_parts(i + 1)) for i in range(MAX_CLASSES - 1)]
    assert steps[:100] == [1] * 100 and sum(s == 1 for s in steps) >= MAX_CLASSES - 3
    # ...and even a small set uses every slot and every mark shape.
    first = [class_parts(i) for i in range(8)]
    assert all(len({p[s] for p in first}) >= 2 for s in range(len(SLOTS)))
    assert {m for p in first for m in p} == set(MARKS)


def test_too_many_classes_and_bad_sizes(tmp_path):
    with pytest.raises(DataError, match=f"1 to {MAX_CLASSES}"):
        generate(tmp_path / "x", classes=MAX_CLASSES + 1)
    with pytest.raises(DataError, match=str(MAX_CLASSES)):
        class_names(MAX_CLASSES + 1)
    with pytest.raises(DataError, match="at least 32"):
        generate(tmp_path / "x", classes=2, size=31)
    assert not (tmp_path / "x").exists()


def test_reused_when_parameters_match(tmp_path):
    out = generate(tmp_path / "s", **SMALL)
    before = _mtimes(out)
    assert generate(tmp_path / "s", **SMALL) == out
    assert _mtimes(out) == before
    # Other parameters: the old tree is replaced, not mixed in.
    generate(tmp_path / "s", **{**SMALL, "per_class": 2})
    assert not (out / "train" / class_names(3)[0] / "0002.png").exists()
    assert len(list((out / "train").rglob("*.png"))) == 6


def test_interrupted_tree_is_regenerated(tmp_path):
    out = generate(tmp_path / "s", **SMALL)
    reference = _tree(out)
    (out / "synthetic.json").unlink()  # as if killed before finishing
    stale = out / "train" / "c99_ring-ring-bar"
    stale.mkdir()
    (stale / "0000.png").write_bytes(b"partial")
    generate(out, **SMALL)
    assert not stale.exists()
    assert (out / "synthetic.json").is_file()
    assert _tree(out) == reference


@pytest.mark.parametrize(
    "intruder",
    [
        "notes.txt",
        "train/readme.md",
        "test/c00_dot-dot-dot/photo.jpg",
        "train/c00_dot-dot-dot/sub/0000.png",
        "train/cat/0001.png",  # a user's own PNG dataset in imagefolder layout
    ],
)
def test_refuses_to_delete_user_files(tmp_path, intruder):
    path = tmp_path / "mine" / intruder
    path.parent.mkdir(parents=True)
    path.write_bytes(b"precious")
    with pytest.raises(DataError, match="not a synthetic set"):
        generate(tmp_path / "mine", **SMALL)
    assert path.read_bytes() == b"precious"


def test_random_stream_does_not_depend_on_class():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    render(0, a, 64, 8)
    render(5, b, 64, 8)
    assert a.bit_generator.state == b.bit_generator.state


@pytest.mark.parametrize("size", [64, 128])
def test_classes_differ_only_in_a_small_part(size):
    """Two classes one part apart, same random stream: the difference is one small local patch."""
    pairs = [
        (i, j)
        for i in range(16)
        for j in range(16)
        if _differing(class_parts(i), class_parts(j)) == 1
    ]
    fractions = []
    for seed in range(12):
        i, j = pairs[seed % len(pairs)]
        x = np.asarray(render(i, np.random.default_rng(seed), size, 16), dtype=int)
        y = np.asarray(render(j, np.random.default_rng(seed), size, 16), dtype=int)
        diff = np.abs(x - y).max(axis=-1) > 0
        rows, cols = np.nonzero(diff)
        fractions.append(diff.mean())
        # one compact patch, not changes spread over the image
        assert np.ptp(rows) < 0.2 * size and np.ptp(cols) < 0.2 * size
    assert max(fractions) < 0.03
    assert min(fractions) > 0.001  # the part is really drawn (a few pixels even for dot vs ring)


def test_render_checks_arguments():
    rng = np.random.default_rng(0)
    image = render(2, rng, 40, 3)
    assert image.mode == "RGB" and image.size == (40, 40)
    with pytest.raises(DataError, match="out of range"):
        render(3, rng, 64, 3)


def test_source_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKCLOSER_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(**SMALL, seed=3))
    splits = build_source(cfg)
    assert splits.name == "synthetic"
    assert splits.classes == class_names(3)
    assert len(splits.train) == 9 and len(splits.test) == 6
    assert [s.label for s in splits.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    root = synthetic.default_root(**SMALL, seed=3)
    assert root.parent == tmp_path / "cache" / "synthetic"
    assert splits.train[0].path.startswith(str(root))
    assert cfg.root is None  # the caller's config is not modified


def test_source_honours_data_root(tmp_path):
    cfg = DataConfig(
        source="synthetic", root=str(tmp_path / "here"), synthetic=SyntheticConfig(**SMALL)
    )
    splits = synthetic.synthetic_source(cfg)
    assert (tmp_path / "here" / "synthetic.json").is_file()
    assert all(s.path.startswith(str(tmp_path / "here")) for s in splits.train + splits.test)
