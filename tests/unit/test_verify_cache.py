"""The image verification cache: a folder's second start decodes nothing, changed files are
verified again, bad images stay bad with the same report, a broken cache is rebuilt."""

from __future__ import annotations

import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookcloser.data.duplicates as duplicates
import lookcloser.data.images as images
from lookcloser.config import DataConfig
from lookcloser.data import verify_cache as vc
from lookcloser.data.prepare import prepare_data, verified
from lookcloser.data.sources import DatasetSplits, Sample
from lookcloser.errors import DataError

HOUR_AGO = time.time() - 3600


def _png(path: Path, colour: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (colour, 255 - colour, colour // 2)).save(path)
    os.utime(path, (HOUR_AGO, HOUR_AGO))  # older than the racy window


def _folder(root: Path, per_class: int = 4) -> Path:
    """An imagefolder with train/ and test/, 3 classes; equal-size PNGs (hashed for copies)."""
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(3):
            for i in range(count):
                _png(
                    root / split / f"class{c}" / f"{i}.png",
                    40 * c + 7 * i + 100 * (split == "test"),
                )
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LOOKCLOSER_CACHE", str(folder))
    return folder / "verify"


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    """How many images are decoded and how many files are read for a content hash."""
    seen = {"decode": 0, "digest": 0}
    decode, digest = images.decode_bytes, duplicates._digest

    def counting_decode(*args, **kwargs):
        seen["decode"] += 1
        return decode(*args, **kwargs)

    def counting_digest(*args, **kwargs):
        seen["digest"] += 1
        return digest(*args, **kwargs)

    monkeypatch.setattr(images, "decode_bytes", counting_decode)
    monkeypatch.setattr(duplicates, "_digest", counting_digest)
    return seen


def _cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(root), **kwargs)


def _summary(data) -> tuple:
    return (
        [(s.path, s.label) for s in data.train],
        [s.path for s in data.val],
        [s.path for s in data.test],
        data.skipped,
    )


def test_second_start_on_an_unchanged_folder_decodes_and_reads_nothing(tmp_path, cache, counts):
    root = _folder(tmp_path / "data")
    first = prepare_data(_cfg(root))
    assert counts["decode"] == 18 and counts["digest"] == 0  # digests came with verification
    assert len(list(cache.glob("*.npz"))) == 1
    counts.update(decode=0, digest=0)
    second = prepare_data(_cfg(root))
    assert counts == {"decode": 0, "digest": 0}
    assert _summary(second) == _summary(first)
    # The same splits as a run that neither verifies nor caches (file contents hashed).
    plain = prepare_data(_cfg(root, verify_images=False))
    assert _summary(plain) == _summary(first) and counts["digest"] > 0


def test_a_changed_file_is_verified_again_and_a_broken_one_turns_bad(tmp_path, cache, counts):
    root = _folder(tmp_path / "data")
    prepare_data(_cfg(root))
    counts.update(decode=0)
    changed = root / "train" / "class1" / "2.png"
    _png(changed, 200, size=20)  # new size and content
    broken = root / "test" / "class2" / "0.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated: new size
    os.utime(broken, (HOUR_AGO, HOUR_AGO))
    touched = root / "train" / "class0" / "1.png"
    os.utime(touched, (HOUR_AGO + 5, HOUR_AGO + 5))  # same bytes, new mtime: checked again
    data = prepare_data(_cfg(root, on_bad_image="skip"))
    assert counts["decode"] == 3
    assert data.skipped == [f"{broken}: truncated or corrupt: unreadable PNG header"]
    assert str(broken) not in [s.path for s in data.test]


def test_bad_images_stay_bad_from_the_cache_with_the_same_report(tmp_path, cache, counts):
    root = _folder(tmp_path / "data")
    bad = root / "train" / "class0" / "3.png"
    bad.write_bytes(b"not an image at all")
    os.utime(bad, (HOUR_AGO, HOUR_AGO))
    with pytest.raises(DataError) as first_error:
        prepare_data(_cfg(root))
    skip_first = prepare_data(_cfg(root, on_bad_image="skip"))
    counts.update(decode=0)
    with pytest.raises(DataError) as second_error:
        prepare_data(_cfg(root))
    skip_second = prepare_data(_cfg(root, on_bad_image="skip"))
    assert counts["decode"] == 0  # the error run saved its verdicts too
    assert str(second_error.value) == str(first_error.value)
    assert "1 unreadable image(s) out of 12" in str(second_error.value)  # of the train split
    assert (
        skip_second.skipped
        == skip_first.skipped
        == [f"{bad}: not an image (cannot identify format)"]
    )
    assert str(bad) not in [s.path for s in skip_second.train + skip_second.val]


def test_settings_that_change_the_verdict_have_their_own_cache(tmp_path, cache, counts):
    root = _folder(tmp_path / "data")
    prepare_data(_cfg(root))
    counts.update(decode=0)
    data = prepare_data(_cfg(root, max_image_pixels=100, on_bad_image="skip"))
    assert counts["decode"] == 18 and len(data.skipped) == 18 - len(data.train) - len(data.val)
    assert all("exceeds data.max_image_pixels=100" in line for line in data.skipped)
    assert len(list(cache.glob("*.npz"))) == 2
    counts.update(decode=0)
    prepare_data(_cfg(root))  # the first settings' verdicts are still there
    assert counts["decode"] == 0


def test_files_modified_just_now_are_verified_again(tmp_path, cache, counts):
    root = _folder(tmp_path / "data")
    fresh = root / "train" / "class2" / "0.png"
    os.utime(fresh)  # now: within the racy window, its verdict is not kept
    prepare_data(_cfg(root))
    counts.update(decode=0)
    prepare_data(_cfg(root))
    assert counts["decode"] == 1


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered", "pickle", "compressed"])
def test_a_corrupt_or_tampered_cache_is_ignored_and_rebuilt(
    tmp_path, cache, counts, caplog, damage
):
    root = _folder(tmp_path / "data", per_class=2)
    bad = root / "train" / "class1" / "0.png"
    bad.write_bytes(b"junk")
    os.utime(bad, (HOUR_AGO, HOUR_AGO))
    cfg = _cfg(root, on_bad_image="skip")
    reference = prepare_data(cfg)
    (file,) = cache.glob("*.npz")
    marker = tmp_path / "unpickled"
    if damage == "garbage":
        file.write_bytes(b"PK\x03\x04" + os.urandom(200))
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    else:
        with np.load(file) as npz:
            arrays = {name: npz[name] for name in npz.files}
        if damage == "tampered":  # the bad image marked fine, checksum left as it was
            arrays["problem"] = np.full_like(arrays["problem"], -1)
            np.savez(file, **arrays)
        elif damage == "pickle":
            arrays["problem_text"] = np.array([_Marker(marker)], dtype=object)
            with open(file, "wb") as f:
                np.savez(f, **arrays)
            assert pickle.loads(pickle.dumps(_Marker(tmp_path / "probe"))) is None
            assert (tmp_path / "probe").exists()  # the payload would run if unpickled
        else:
            np.savez_compressed(file, **arrays)
    counts.update(decode=0)
    with caplog.at_level(logging.WARNING, logger="lookcloser.data.verify_cache"):
        again = prepare_data(cfg)
    assert "ignoring the image verification cache" in caplog.text
    assert not marker.exists()
    assert counts["decode"] == 12  # everything verified again
    assert _summary(again) == _summary(reference)
    counts.update(decode=0)
    prepare_data(cfg)  # rebuilt: the next start reads it
    assert counts["decode"] == 0


def test_verification_runs_in_chunks_with_the_same_verdicts(tmp_path, cache, monkeypatch, counts):
    monkeypatch.setattr(images, "VERIFY_CHUNK", 3)
    folder = tmp_path / "imgs"
    paths = []
    for i in range(10):
        path = folder / f"{i}.png"
        _png(path, 20 * i)
        paths.append(str(path))
    for i in (2, 7):
        Path(paths[i]).write_bytes(b"")
    samples = [Sample(p, i % 2) for i, p in enumerate(paths)]
    # A path listed twice is verified once; another spelling of a file is a path of its own.
    samples += [Sample(paths[4], 1), Sample(f"{folder}/./2.png", 0)]
    cfg = DataConfig(source="csv", root=str(folder), on_bad_image="skip")
    splits = DatasetSplits(["a", "b"], samples, [])
    kept, skipped = verified(splits, cfg)
    bad = ("/2.png", "/7.png")
    assert [s.path for s in kept.train] == [s.path for s in samples if not s.path.endswith(bad)]
    spelt = f"{folder}/./2.png"
    assert skipped == [f"{p}: empty file" for p in (paths[2], paths[7], spelt)]
    assert counts["decode"] == 8
    again, skipped_again = verified(splits, cfg)
    assert skipped_again == skipped and list(again.train) == list(kept.train)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOKCLOSER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vc.cache_dir() == tmp_path / "xdg" / "lookcloser" / "verify"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec: absolute paths only
    assert vc.cache_dir() == Path.home() / ".cache" / "lookcloser" / "verify"
    monkeypatch.setenv("LOOKCLOSER_CACHE", str(tmp_path / "own"))
    assert vc.cache_dir() == tmp_path / "own" / "verify"


def test_an_unwritable_cache_folder_only_warns(tmp_path, monkeypatch, caplog, counts):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LOOKCLOSER_CACHE", str(blocker))
    root = _folder(tmp_path / "data", per_class=2)
    with caplog.at_level(logging.WARNING, logger="lookcloser.data.verify_cache"):
        data = prepare_data(_cfg(root))
    assert len(data.train) + len(data.val) == 6 and counts["decode"] == 12
    assert "could not save the image verification cache" in caplog.text
