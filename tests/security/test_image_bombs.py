"""Image bombs that pass the pixel limit: tiny PNGs of extreme aspect ratio (1 x 200,000,
1 x 2,000,000, 200,000 x 1). The shorter-side resize of the evaluation transform used to make
them hundreds of millions of pixels (GBs, or a MemoryError and a 500 from the server). Each path
that reads an image (decoding, the transforms, predict, the server, the check before training)
must refuse them by name, in bounded memory."""

from __future__ import annotations

import json
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from fastapi.testclient import TestClient
from PIL import Image

from lookcloser.cli import main
from lookcloser.config import Config
from lookcloser.data.images import (
    MAX_ASPECT_RATIO,
    check_images,
    decode_bytes,
    load_image,
    verify_samples,
)
from lookcloser.data.loading import ImageDataset
from lookcloser.data.prepare import TrainingData
from lookcloser.data.sources import Sample
from lookcloser.data.transforms import MAX_RESIZE_ASPECT, eval_transform, train_transform
from lookcloser.errors import BadImageError, BadImagesError, DataError
from lookcloser.methods import build_method
from lookcloser.predictor import Predictor
from lookcloser.serve.app import create_app
from lookcloser.training import save_run_model
from lookcloser.tta import TTA

SIZE = 32  # the model's input size: the resize target is floor(32 / 0.875) = 36
BUDGET_MB = 300  # what reading one bad image may add to this process's memory
BOMBS = [(1, 200_000), (1, 2_000_000), (200_000, 1)]


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


@contextmanager
def memory_budget(mb: float = BUDGET_MB):
    """Fail if the process's resident memory grows by more than `mb` MiB inside the block
    (sampled every 2 ms, and the kernel's own peak: a resize to GBs cannot slip through)."""
    start, start_peak = _rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    grown = max(
        peak[0] - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_peak
    )
    assert grown < mb, f"memory grew by {grown:.0f} MiB (budget {mb} MiB)"


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> list[Path]:
    """Real PNG files, each under 4 KB and under the default pixel limit."""
    root = tmp_path_factory.mktemp("bombs")
    paths = []
    for width, height in BOMBS:
        path = root / f"strip_{width}x{height}.png"
        Image.new("L", (width, height)).save(path, optimize=True)
        assert path.stat().st_size < 4_000
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.png"
    Image.new("RGB", (48, 40), (10, 200, 30)).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny untrained model directory (32 px input, crop_pct 0.875)."""
    torch.manual_seed(0)
    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            "data.crop_pct=0.875",
        ],
    )
    path = tmp_path_factory.mktemp("model")
    save_run_model(
        path, build_method(cfg, 3).eval(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic"
    )
    return path


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.load(model_dir)


def _size(path: Path) -> str:
    return path.stem.removeprefix("strip_")


# ---- decoding and the transforms -----------------------------------------------------------------
def test_load_image_refuses_extreme_aspect_ratio_by_name(bombs):
    """load_image (every file read goes through it) refuses each strip, naming the file, its
    size and the limit, at the cost of its header."""
    for path in bombs:
        with memory_budget(), pytest.raises(BadImageError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and _size(path) in message, message
        assert f"{MAX_ASPECT_RATIO}:1" in message, message
    # At the limit itself an image is accepted.
    edge = bombs[0].parent / "edge.png"
    Image.new("L", (2, 2 * MAX_ASPECT_RATIO)).save(edge)
    assert load_image(edge).size == (2, 2 * MAX_ASPECT_RATIO)


def test_transforms_bound_the_resized_image(bombs):
    """An in-memory strip (the Python API takes PIL images, which skip the decoder's check)
    goes through the evaluation, training and test-time transforms in bounded memory, and
    gives the model's input size."""
    strips = [Image.new("RGB", size) for size in BOMBS]
    views = TTA.parse("flip,five_crop,scales=32+48").views(SIZE, 0.875)
    cfg = Config().apply_overrides([f"data.image_size={SIZE}", "data.rotation=10"]).data
    for image in strips:
        with memory_budget():
            assert eval_transform(SIZE, 0.875)(image).shape == (3, SIZE, SIZE)
            assert train_transform(cfg)(image).shape == (3, SIZE, SIZE)
            assert [v.shape for v in views(image)] == [(5, 3, 32, 32), (5, 3, 48, 48)]


def test_the_bound_leaves_ordinary_images_as_timm_makes_them():
    """Up to MAX_RESIZE_ASPECT:1, the evaluation transform is exactly timm's resize and centre
    crop; beyond it, the centre the crop shows is still the same picture."""
    gradient = torch.linspace(0, 1, 400).repeat(3, 100, 1)  # 3 x 100 x 400: 4:1
    image = T.ToPILImage()(gradient)
    plain = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)])
    assert MAX_RESIZE_ASPECT >= 400 / 100
    assert torch.equal(eval_transform(SIZE, 0.875)(image), T.ToTensor()(plain(image)))
    wide = T.ToPILImage()(torch.linspace(0, 1, 2000).repeat(3, 100, 1))  # 20:1, cut to 4:1
    got, want = eval_transform(SIZE, 0.875)(wide), T.ToTensor()(plain(wide))
    assert (got - want).abs().max() < 0.02


def test_a_memory_error_while_preprocessing_names_the_file(good):
    """Whatever a transform's resize runs out of (here torchvision's plain Resize asked for
    more than PIL can hold), the dataset answers a BadImageError naming the image, not a
    MemoryError from a DataLoader worker."""
    dataset = ImageDataset([Sample(str(good), 0)], T.Resize(2_000_000_000), 10**9)
    with memory_budget(), pytest.raises(BadImageError, match="good.png") as info:
        dataset[0]
    assert "memory" in str(info.value) or "too large" in str(info.value)


# ---- predict, the CLI, the server, the check before training ---------------------------------------
def test_predict_skips_or_names_every_bomb(predictor, bombs, good):
    """Predictor.predict lists the strips as skipped (skip) or raises naming each (error)."""
    with memory_budget():
        results = predictor.predict([good, *bombs], on_bad_image="skip")
    assert [p.path for p in results] == [str(good)]
    assert [path for path, _ in results.skipped] == [str(p) for p in bombs]
    assert all("aspect ratio" in reason for _, reason in results.skipped)
    with memory_budget(), pytest.raises(BadImagesError) as info:
        predictor.predict([good, *bombs])
    assert all(str(p) in str(info.value) for p in bombs)


def test_cli_predict_skips_or_fails_in_one_line(model_dir, bombs, good, capsys):
    """`lookcloser predict`: --on-bad-image skip predicts the good file and lists the bombs;
    without it, a one-line error naming them (exit 2), no traceback."""
    args = ["predict", str(model_dir), str(good), *map(str, bombs), "--format", "json"]
    assert main([*args, "--on-bad-image", "skip"]) == 0
    out = capsys.readouterr()
    assert [p["path"] for p in json.loads(out.out)] == [str(good)]
    for path in bombs:
        assert f"skipped: {path}: " in out.err
    assert main(["predict", str(model_dir), str(bombs[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lookcloser: error:") and str(bombs[1]) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_server_answers_422_naming_the_size(predictor, bombs, good):
    """POST /predict and /explain answer 422 for each strip (not 500), then still serve."""
    with TestClient(create_app(predictor), base_url="http://127.0.0.1") as client:
        for path in bombs:
            for route in ("/predict", "/explain"):
                with memory_budget():
                    response = client.post(
                        route, files={"file": (path.name, path.read_bytes(), "image/png")}
                    )
                assert response.status_code == 422, response.text
                detail = response.json()["detail"]
                assert path.name in detail and _size(path) in detail and "aspect" in detail
        ok = client.post("/predict", files={"file": ("g.png", good.read_bytes(), "image/png")})
        assert ok.status_code == 200


def test_check_before_training_skips_or_lists_bombs(bombs, good):
    """verify_samples (run before training, per data.on_bad_image) and `data check` see the
    strips: skip drops them, error lists them."""
    samples = [Sample(str(good), 0)] + [Sample(str(p), 1) for p in bombs]
    with memory_budget():
        kept, bad = verify_samples(samples, "skip", max_pixels=89_478_485)
    assert [s.path for s in kept] == [str(good)] and len(bad) == len(bombs)
    with pytest.raises(DataError) as info:
        verify_samples(samples, "error", max_pixels=89_478_485)
    assert "3 unreadable image(s)" in str(info.value) and "aspect ratio" in str(info.value)
    report = check_images([good, *bombs], workers=1)
    assert sorted(r.path for r in report.bad) == sorted(str(p) for p in bombs)


def test_decoder_errors_of_any_kind_become_bad_image_errors():
    """Bytes that make PIL fail in ways other than OSError (here an IHDR with a zero width,
    which PIL refuses with a ValueError/SystemError depending on version) are a
    BadImageError naming the input."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    for width, height in [(0, 10), (2**31 - 1, 2**31 - 1)]:
        png = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b"")
        )
        with pytest.raises(BadImageError, match="upload.png"):
            decode_bytes("upload.png", png)


def test_time_is_bounded_too(bombs):
    """Refusing a strip costs its header, not the 20 s the resize of one took."""
    start = time.monotonic()
    for path in bombs:
        with pytest.raises(BadImageError):
            load_image(path)
    assert time.monotonic() - start < 2
