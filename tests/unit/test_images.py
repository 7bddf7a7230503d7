"""Safe decoding: every odd or broken file either becomes RGB or a BadImageError naming it."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lookcloser.data.images import (
    check_images,
    inspect_image,
    list_image_files,
    load_image,
    verify_samples,
)
from lookcloser.data.sources import Sample
from lookcloser.errors import BadImageError, DataError


def _jpeg_bytes(size=(80, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but holds almost no pixel data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One file per case, keyed by a short name."""
    f: dict[str, Path] = {}
    jpg = _jpeg_bytes()

    def put(name: str, data: bytes) -> None:
        f[name.split(".")[0]] = tmp_path / name
        (tmp_path / name).write_bytes(data)

    put("good.jpg", jpg)
    sos = jpg.find(b"\xff\xda")  # valid header segments up to the start of scan
    put("corrupt.jpg", jpg[:sos] + np.random.default_rng(1).bytes(3000))
    put("header_garbage.jpg", jpg[:20] + np.random.default_rng(2).bytes(3000))
    put("truncated.jpg", jpg[: len(jpg) // 2])
    put("empty.jpg", b"")
    put("text.jpg", b"this is not an image, just text\n" * 10)
    put("bomb.png", _png_header_only(30_000, 30_000))

    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    f["cmyk"] = tmp_path / "cmyk.jpg"

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    f["gray16"] = tmp_path / "gray16.png"

    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 0)  # fully transparent red: must come out white
    rgba[:, 10:] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    f["rgba"] = tmp_path / "rgba.png"

    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    pal.paste(1, (10, 0, 20, 10))
    pal.save(tmp_path / "palette.png", transparency=0)
    f["palette"] = tmp_path / "palette.png"

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 120, 200)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    f["rotated"] = tmp_path / "rotated.jpg"

    Image.new("L", (100, 100), 128).save(tmp_path / "big.png")
    f["big"] = tmp_path / "big.png"
    return f


BAD_REASONS = {
    "corrupt": "truncated or corrupt",
    "header_garbage": "truncated or corrupt",
    "truncated": "truncated or corrupt",
    "empty": "empty file",
    "text": "not an image (cannot identify format)",
    "bomb": "decompression bomb",
}


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_files_raise_bad_image_error_naming_the_file(files, name):
    with pytest.raises(BadImageError) as info:
        load_image(files[name])
    assert BAD_REASONS[name] in info.value.reason
    assert str(files[name]) in str(info.value)
    assert isinstance(info.value, DataError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(BadImageError, match="directory"):
        load_image(tmp_path)


def test_pixel_limit_checked_before_decoding(files):
    with pytest.raises(BadImageError, match=r"10000 pixels exceeds data.max_image_pixels=5000"):
        load_image(files["big"], max_pixels=5000)
    assert load_image(files["big"], max_pixels=10_000).size == (100, 100)


def test_pil_global_settings_untouched(files):
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    for path in files.values():
        inspect_image(path)
    assert before == (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)


def test_good_jpeg_is_rgb(files):
    image = load_image(files["good"])
    assert image.mode == "RGB" and image.size == (80, 64)


def test_cmyk_becomes_rgb(files):
    image = load_image(files["cmyk"])
    assert image.mode == "RGB"
    r, g, b = np.asarray(image).reshape(-1, 3).mean(0)
    assert r > 200 and g < 80 and b < 80  # C=0, M=Y=255 is red


def test_16_bit_grayscale_keeps_its_gradient(files):
    assert Image.open(files["gray16"]).mode == "I;16"
    arr = np.asarray(load_image(files["gray16"]))
    row = arr[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 50
    assert np.all(arr[..., 0] == arr[..., 1])


def test_alpha_composited_onto_white(files):
    arr = np.asarray(load_image(files["rgba"]))
    assert tuple(arr[5, 2]) == (255, 255, 255)
    assert tuple(arr[5, 15]) == (0, 0, 255)
    pal = np.asarray(load_image(files["palette"]))
    assert tuple(pal[5, 2]) == (255, 255, 255)  # transparent palette index
    assert tuple(pal[5, 15]) == (0, 200, 0)


def test_exif_orientation_applied(files):
    assert Image.open(files["rotated"]).size == (40, 20)
    assert load_image(files["rotated"]).size == (20, 40)


def test_check_images_finds_bad_duplicates_and_odd_modes(files, tmp_path):
    copy = tmp_path / "copy_of_good.jpg"
    shutil.copy(files["good"], copy)
    paths = [str(p) for p in files.values()] + [str(copy), str(files["good"])]
    report = check_images(paths, workers=3)
    assert report.total == len(paths)
    assert [r.path for r in report.reports] == paths  # input order kept
    assert {r.path for r in report.bad} == {str(files[n]) for n in BAD_REASONS}
    assert report.duplicates == [[str(files["good"]), str(copy)]]
    assert {r.mode for r in report.odd_modes} == {"CMYK", "I;16", "RGBA", "P"}
    good = next(r for r in report.reports if r.path == str(files["good"]))
    assert good.ok and good.size == (80, 64) and good.mode == "RGB" and not good.odd_mode
    lines = report.summary_lines()
    assert lines[0].startswith(f"checked {len(paths)} image(s): {len(BAD_REASONS)} unreadable")
    assert any(str(files["empty"]) in line and "empty file" in line for line in lines)
    assert any(line.startswith("mode CMYK:") for line in lines)


def _samples(paths) -> list[Sample]:
    return [Sample(str(p), i % 2) for i, p in enumerate(paths)]


def test_verify_samples_error_lists_bad_files(files):
    samples = _samples([files["good"], files["empty"], files["text"], files["cmyk"]])
    with pytest.raises(DataError) as info:
        verify_samples(samples, "error", max_pixels=10**6, workers=2)
    message = str(info.value)
    assert message.startswith("2 unreadable image(s) out of 4")
    assert "\n" not in message  # the CLI prints errors as one line
    assert f"{files['empty']} (empty file)" in message
    assert str(files["text"]) in message
    assert "Set data.on_bad_image=skip" in message


def test_verify_samples_skip_returns_good_ones(files):
    samples = _samples([files["good"], files["truncated"], files["rgba"], files["good"]])
    good, bad = verify_samples(samples, "skip", max_pixels=10**6)
    assert good == [samples[0], samples[2], samples[3]]
    assert [r.path for r in bad] == [str(files["truncated"])]
    assert verify_samples(samples[:1], "error", max_pixels=10**6) == (samples[:1], [])


def test_verify_samples_long_list_is_cut(tmp_path):
    paths = []
    for i in range(23):
        paths.append(tmp_path / f"{i:02d}.jpg")
        paths[-1].write_bytes(b"")
    with pytest.raises(DataError) as info:
        verify_samples(_samples(paths), "error", max_pixels=100)
    assert str(info.value).startswith("23 unreadable")
    assert "and 20 more" in str(info.value)
    assert str(paths[2]) in str(info.value) and str(paths[3]) not in str(info.value)


def test_verify_samples_rejects_unknown_policy(files):
    with pytest.raises(DataError, match=r"data.on_bad_image.*'error' or 'skip'.*'ignore'"):
        verify_samples(_samples([files["good"]]), "ignore", max_pixels=100)


def test_list_image_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("z.jpg", "a/y.PNG", "a/b/x.webp", "a/notes.txt", "a/.hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert list_image_files(tmp_path) == [
        tmp_path / "a" / "b" / "x.webp",
        tmp_path / "a" / "y.PNG",
        tmp_path / "z.jpg",
    ]
    assert list_image_files(tmp_path / "a" / "notes.txt") == [tmp_path / "a" / "notes.txt"]
    with pytest.raises(DataError, match="does not exist"):
        list_image_files(tmp_path / "missing")
