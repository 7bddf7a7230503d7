"""Safe image decoding and dataset image checks.

Every image the toolkit reads goes through `load_image`, which always returns an 8-bit RGB
image or raises `BadImageError` with a reason a user can act on. `check_images` and
`verify_samples` run the same decoder over a whole dataset up front, so a corrupt file fails
(or is skipped) before training starts rather than in a DataLoader worker hours later.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import struct
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lookcloser.data.duplicates import SplitOverlap
from lookcloser.data.sources import Sample, is_image_file
from lookcloser.errors import BadImageError, DataError, LookcloserError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb threshold
# Longest accepted side over shortest side. Under the pixel limit a 1 x 2,000,000 strip is a few
# KB, but the evaluation resize (shorter side to ~256) would make it 256 x 512M pixels; no
# photograph comes near 50:1 (panoramas are 4:1 to 10:1).
MAX_ASPECT_RATIO = 50
PLAIN_MODES = ("RGB", "L")  # modes that need no colour conversion worth mentioning
MAX_LISTED = 20  # bad files listed one by one in error messages and summaries

# Leading bytes of common formats: a file that starts like an image but cannot be parsed is
# reported as corrupt rather than "not an image".
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def check_image_shape(path: str | Path, width: int, height: int) -> None:
    """BadImageError unless the longer side is at most MAX_ASPECT_RATIO times the shorter."""
    if min(width, height) < 1:
        raise BadImageError(path, f"{width}x{height}: an image needs at least one pixel")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        shown = f"{ratio:.1f}" if ratio < 1000 else f"{ratio:.0f}"
        raise BadImageError(
            path,
            f"{width}x{height}: aspect ratio {shown}:1 exceeds the limit of "
            f"{MAX_ASPECT_RATIO}:1 (longer side / shorter side)",
        )


@contextlib.contextmanager
def image_errors(path: str | Path) -> Iterator[None]:
    """Turn any failure to decode or preprocess the image `path` into a BadImageError.

    Transforms run on untrusted pixels: PIL and torchvision answer an image too large for a
    step with MemoryError, OverflowError or ValueError, which would otherwise surface as a 500
    or a DataLoader worker traceback without the file's name.
    """
    try:
        yield
    except LookcloserError:
        raise
    except MemoryError:
        raise BadImageError(path, "too large to preprocess: out of memory") from None
    except (OverflowError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"too large to preprocess: {e}") from None
    except (*_DECODE_ERRORS, RuntimeError) as e:  # torch's failed allocations are RuntimeError
        raise BadImageError(path, f"cannot preprocess: {type(e).__name__}: {e}") from None


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file fully into 8-bit RGB, or raise BadImageError saying why not."""
    data = _read_bytes(path)
    image, _ = decode_bytes(path, data, max_pixels)
    return image


@dataclass
class ImageReport:
    """What checking one image found: whether it decodes, and its mode, size and content hash."""

    path: str
    ok: bool
    problem: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    sha1: str | None = None
    odd_mode: bool = False


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageReport:
    """Check one image without raising: decodability, original mode, size and SHA-1 of its bytes."""
    try:
        data = _read_bytes(path)
    except BadImageError as e:
        return ImageReport(str(path), ok=False, problem=e.reason)
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        image, mode = decode_bytes(path, data, max_pixels)
    except BadImageError as e:
        return ImageReport(str(path), ok=False, problem=e.reason, sha1=sha1)
    return ImageReport(
        str(path),
        ok=True,
        mode=mode,
        size=image.size,
        sha1=sha1,
        odd_mode=mode not in PLAIN_MODES,
    )


@dataclass
class CheckReport:
    """The results of checking a set of images: per-file reports plus the problems found."""

    reports: list[ImageReport]
    bad: list[ImageReport] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    odd_modes: list[ImageReport] = field(default_factory=list)
    # Files a dataset's own train / val / test split shares between splits (`check_dataset`).
    overlaps: list[SplitOverlap] = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many images were checked."""
        return len(self.reports)

    def as_dict(self) -> dict:
        """Plain data for JSON output."""
        return {
            "total": self.total,
            "bad": [{"path": r.path, "problem": r.problem} for r in self.bad],
            "duplicates": self.duplicates,
            "odd_modes": [{"path": r.path, "mode": r.mode} for r in self.odd_modes],
            "split_overlaps": [o.as_dict() for o in self.overlaps],
        }

    def summary_lines(self, limit: int = MAX_LISTED) -> list[str]:
        """Human-readable lines: a count line, then bad files, duplicate groups and odd modes."""
        n_dup_files = sum(len(g) for g in self.duplicates)
        lines = [
            f"checked {self.total} image(s): {len(self.bad)} unreadable, "
            f"{len(self.duplicates)} duplicate group(s) ({n_dup_files} files), "
            f"{len(self.odd_modes)} in an unusual colour mode (converted to RGB)"
        ]
        lines += _limited([f"bad: {r.path}: {r.problem}" for r in self.bad], limit)
        lines += _limited([f"duplicate: {' == '.join(group)}" for group in self.duplicates], limit)
        lines += _limited([f"mode {r.mode}: {r.path}" for r in self.odd_modes], limit)
        lines += [f"split overlap: {o.describe()}" for o in self.overlaps]
        return lines


def check_images(
    paths: Iterable[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4
) -> CheckReport:
    """Decode every image (in threads) and collect unreadable files, duplicates and odd modes."""
    paths = [str(p) for p in paths]
    reports = _inspect_all(paths, max_pixels, workers)
    by_hash: dict[str, list[str]] = defaultdict(list)
    for r in reports:
        # The same path listed twice is one file, not a duplicate.
        if r.sha1 is not None and r.path not in by_hash[r.sha1]:
            by_hash[r.sha1].append(r.path)
    return CheckReport(
        reports=reports,
        bad=[r for r in reports if not r.ok],
        duplicates=[group for group in by_hash.values() if len(group) >= 2],
        odd_modes=[r for r in reports if r.ok and r.odd_mode],
    )


def check_dataset(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckReport:
    """`check_images` over a file, a folder, or a dataset with its own split, whose files
    shared between train, val and test are reported too: an imagefolder root with train/
    beside test/ or val/, a CSV file (data.source=csv) or a folder with train.csv."""
    from lookcloser.config import DataConfig
    from lookcloser.data.duplicates import split_overlaps
    from lookcloser.data.sources import build_source

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: does not exist")
    source = None
    if (path.is_file() and path.suffix.lower() == ".csv") or (path / "train.csv").is_file():
        source = "csv"
    elif (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir()):
        source = "imagefolder"
    if source is None:
        return check_images(list_image_files(path), max_pixels=max_pixels)
    splits = build_source(DataConfig(source=source, root=str(path)))
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    if source == "csv":
        files = list(dict.fromkeys(s.path for samples in parts.values() for s in samples))
    else:
        files = list_image_files(path)
    report = check_images(files, max_pixels=max_pixels)
    report.overlaps = split_overlaps(parts)
    return report


def verify_samples(
    samples: Sequence[Sample], on_bad_image: str, max_pixels: int, workers: int = 4
) -> tuple[list[Sample], list[ImageReport]]:
    """Decode every sample's image; raise on bad ones ("error") or drop them ("skip")."""
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"data.on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")
    unique = list(dict.fromkeys(s.path for s in samples))
    reports = _inspect_all(unique, max_pixels, workers)
    bad = [r for r in reports if not r.ok]
    if not bad:
        return list(samples), []
    if on_bad_image == "error":
        # One line (the CLI prints errors as one line); `lookcloser data check` lists them all.
        shown = "; ".join(f"{r.path} ({r.problem})" for r in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(
            f"{len(bad)} unreadable image(s) out of {len(unique)}: {shown}{more}. "
            "Set data.on_bad_image=skip to skip them, or run `lookcloser data check` for the full list"
        )
    bad_paths = {r.path for r in bad}
    good = [s for s in samples if s.path not in bad_paths]
    log.warning("skipping %d unreadable image(s) of %d", len(bad), len(unique))
    return good, bad


def list_image_files(path: str | Path) -> list[Path]:
    """The file itself, or every image file under a folder (recursively), sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} does not exist")
    return sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))


# ---- internals ------------------------------------------------------------------------------
def _limited(lines: list[str], limit: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"... and {len(lines) - limit} more"]


def _inspect_all(paths: list[str], max_pixels: int, workers: int) -> list[ImageReport]:
    if workers <= 1 or len(paths) <= 1:
        return [inspect_image(p, max_pixels) for p in paths]
    # Decoding releases the GIL for most of its time, so threads do overlap; map keeps order.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: inspect_image(p, max_pixels), paths))


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    try:
        if p.is_dir():
            raise BadImageError(path, "is a directory, not an image file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise BadImageError(path, "empty file")
    return data


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def decode_bytes(
    path: str | Path, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, str]:
    """Fully decode in-memory image bytes (named `path` in errors) to RGB, with the original mode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            # Checked before any pixel is decoded: a bomb costs only its header.
            if width * height > max_pixels:
                raise BadImageError(
                    path,
                    f"{width}x{height} = {width * height} pixels exceeds "
                    f"data.max_image_pixels={max_pixels}",
                )
            check_image_shape(path, width, height)
            im.load()
            mode = im.mode
            try:
                oriented = ImageOps.exif_transpose(im) or im
            except (*_DECODE_ERRORS, KeyError, TypeError):
                oriented = im  # broken EXIF metadata: the pixels are still fine
            try:
                return _to_rgb(oriented), mode
            except ValueError as e:
                raise BadImageError(path, f"unsupported colour mode {mode}: {e}") from None
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS) fires in Image.open, before our check.
        raise BadImageError(
            path, f"too large, refused as a possible decompression bomb: {e}"
        ) from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is None:
            raise BadImageError(path, "not an image (cannot identify format)") from None
        raise BadImageError(path, f"truncated or corrupt: unreadable {fmt} header") from None
    except MemoryError:
        raise BadImageError(path, "truncated or corrupt: out of memory while decoding") from None
    except OverflowError as e:
        raise BadImageError(path, f"too large to decode: {e}") from None
    except _DECODE_ERRORS as e:
        raise BadImageError(path, f"truncated or corrupt: {e}") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decoder failure is the file's
        raise BadImageError(path, f"cannot decode: {type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited onto white, high bit depths rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(im)
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX...: PIL's converters are correct for these.
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8 bits over the values' real range.

    PIL's own convert("L") clips these modes at 255, which turns a 16-bit image white.
    """
    try:
        arr = np.asarray(im)
    except (TypeError, ValueError):  # rarer raw layouts: let PIL widen them to int32 first
        arr = np.asarray(im.convert("I"))
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        scaled = arr / 257.0
    elif lo >= 0 and hi <= 1.0 and im.mode == "F":
        scaled = arr * 255.0  # float images in [0, 1]
    elif lo >= 0 and hi <= 255:
        scaled = arr
    elif lo >= 0 and hi <= 65535:
        scaled = arr / 257.0  # 16-bit data held in a 32-bit mode (older PIL PNG decoding)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
