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
import os
import stat
import struct
import time
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
from lookcloser.data.table import FieldView, SampleTable, sample_paths, take
from lookcloser.data.verify_cache import (
    DIGEST_SIZE,
    RACY_NS,
    VerifyCache,
    path_key,
    stat_row,
)
from lookcloser.errors import BadImageError, DataError, LookcloserError
from lookcloser.progress import track

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
    samples: Sequence[Sample],
    on_bad_image: str,
    max_pixels: int,
    workers: int = 4,
    cache: VerifyCache | None = None,
    progress: bool = False,
    what: str = "images",
) -> tuple[Sequence[Sample], list[ImageReport]]:
    """Decode every sample's image; raise on bad ones ("error") or drop them ("skip").

    With `cache` (data/verify_cache.py), an image whose file is unchanged since it was last
    verified is not read again: its verdict (fine, or bad with its reason) comes from the
    cache, and the new verdicts are recorded there (the caller saves it). Paths are taken in
    chunks, so memory holds a few machine words per sample, not a report per image; a
    progress bar (`progress`) counts the images that must be decoded. A SampleTable is
    returned as a SampleTable (the good rows).
    """
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"data.on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")
    paths = sample_paths(samples)
    keys = np.fromiter((path_key(p) for p in paths), dtype=np.uint64, count=len(paths))
    first = _first_of_each_path(keys, paths)
    unique = np.flatnonzero(first == np.arange(len(first)))
    problems: dict[int, str] = {}  # representative sample -> why its image is unreadable
    misses = _cached_verdicts(unique, keys, paths, cache, problems, workers)
    if len(misses):
        known = len(unique) - len(misses)
        log.info("verifying %d %s (%d known from the cache)", len(misses), what, known)
        _verify_misses(misses, keys, paths, max_pixels, workers, cache, problems, progress, what)
    if not problems:
        return (samples if isinstance(samples, SampleTable) else list(samples)), []
    bad = [ImageReport(paths[i], ok=False, problem=problems[i]) for i in sorted(problems)]
    if on_bad_image == "error":
        # One line (the CLI prints errors as one line); `lookcloser data check` lists them all.
        shown = "; ".join(f"{r.path} ({r.problem})" for r in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(
            f"{len(bad)} unreadable image(s) out of {len(unique)}: {shown}{more}. "
            "Set data.on_bad_image=skip to skip them, or run `lookcloser data check` for the full list"
        )
    is_bad = np.zeros(len(first), dtype=bool)
    is_bad[list(problems)] = True
    good = take(samples, np.flatnonzero(~is_bad[first]))
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


VERIFY_CHUNK = 1024  # images verified (and held in flight) at a time
_STAT_CHUNK = 256  # paths stat-ed per thread task (a task per stat costs more than the stat)
# Bump when what load_image / decode_bytes accept changes: cached verdicts then expire.
DECODER_REVISION = 1


def verify_settings(max_pixels: int) -> dict[str, object]:
    """What a verdict depends on besides the file: the verification cache's key."""
    from PIL import __version__ as pillow

    return {
        "max_pixels": int(max_pixels),
        "max_aspect_ratio": MAX_ASPECT_RATIO,
        "pillow": pillow,
        "decoder": DECODER_REVISION,
    }


def _first_of_each_path(keys: np.ndarray, paths: Sequence[str]) -> np.ndarray:
    """For each sample, the first sample with the same path."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(starts) - 1
    first = np.empty(n, dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][group]
    # Equal keys are a path listed twice; a true 64-bit collision keeps its paths apart.
    for i in np.flatnonzero(first != np.arange(n)).tolist():
        if paths[i] != paths[first[i]]:
            same = [j for j in np.flatnonzero(keys == keys[i]).tolist() if j < i]
            first[i] = next((j for j in same if paths[j] == paths[i]), i)
    return first


def _stats(paths: list[str]) -> np.ndarray:
    """Rows of (dev, ino, size, mtime_ns) per path; -1 where it is not a readable file."""
    out = np.full((len(paths), 4), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                out[i] = stat_row(st)
    return out


def _cached_verdicts(
    unique: np.ndarray,
    keys: np.ndarray,
    paths: FieldView,
    cache: VerifyCache | None,
    problems: dict[int, str],
    workers: int,
) -> np.ndarray:
    """The samples of `unique` whose verdict the cache does not hold; the bad ones it holds
    are added to `problems`."""
    if cache is None or not len(unique):
        return unique
    misses = []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for start in range(0, len(unique), 16 * VERIFY_CHUNK):
            chunk = unique[start : start + 16 * VERIFY_CHUNK]
            names = paths.at(chunk)
            # Threads: on a network file system each stat is a round trip.
            parts = [names[j : j + _STAT_CHUNK] for j in range(0, len(names), _STAT_CHUNK)]
            st = np.concatenate(list(pool.map(_stats, parts)))
            rows = cache.lookup(keys[chunk], st[:, 0], st[:, 1], st[:, 2], st[:, 3])
            rows[st[:, 0] < 0] = -1
            bad = rows >= 0
            bad[bad] = cache.arrays["problem"][rows[bad]] >= 0  # known bad images
            for i, row in zip(chunk[bad].tolist(), rows[bad].tolist(), strict=True):
                problems[i] = cache.problem(row)
            misses.append(chunk[rows < 0])
    return np.concatenate(misses)


def _verify_misses(
    misses: np.ndarray,
    keys: np.ndarray,
    paths: FieldView,
    max_pixels: int,
    workers: int,
    cache: VerifyCache | None,
    problems: dict[int, str],
    progress: bool,
    what: str,
) -> None:
    """Decode the images of `misses`, a chunk in flight at a time; add the bad ones to
    `problems` and record the verdicts that may be kept in `cache`."""
    now = time.time_ns()

    def verdicts() -> Iterator[tuple[int, tuple]]:
        # Decoding releases the GIL for most of its time, so threads do overlap; map keeps order.
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            for start in range(0, len(misses), VERIFY_CHUNK):
                chunk = misses[start : start + VERIFY_CHUNK]
                names = paths.at(chunk)
                results = pool.map(lambda p: _verify_one(p, max_pixels, now), names)
                yield from zip(chunk.tolist(), results, strict=True)

    kept: list[tuple[int, tuple[int, int, int, int], bytes, str | None]] = []

    def record() -> None:
        if kept and cache is not None:
            key_col, stat_rows, digests, texts = zip(*kept, strict=True)
            cache.record(
                np.array(key_col, dtype=np.uint64),
                np.array(stat_rows, dtype=np.int64),
                np.frombuffer(b"".join(digests), dtype=np.uint8),
                list(texts),
            )
        kept.clear()

    try:
        for i, (problem, file_stat, digest) in track(
            verdicts(), f"verify {what}", enabled=progress, total=len(misses)
        ):
            if problem is not None:
                problems[i] = problem
            if file_stat is not None:
                kept.append((int(keys[i]), file_stat, digest, problem))
            if len(kept) >= VERIFY_CHUNK:
                record()
    finally:  # an interrupted pass keeps what it verified
        record()


def _verify_one(
    path: str, max_pixels: int, now_ns: int
) -> tuple[str | None, tuple[int, int, int, int] | None, bytes]:
    """(why the image is unreadable or None, its stat row if the verdict may be cached, digest).

    A verdict is kept only when it is the file's: the file did not change while it was read,
    its modification time is not within RACY_NS of now, and the failure (if any) is not one
    of the moment (a missing file, no permission, out of memory).
    """
    try:
        before = os.stat(path)
    except (OSError, ValueError):
        before = None
    try:
        data = _read_bytes(path)
    except BadImageError as e:
        cacheable = e.reason == "empty file" and before is not None and before.st_size == 0
        return e.reason, (stat_row(before) if cacheable else None), bytes(DIGEST_SIZE)
    digest = hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()
    problem = None
    try:
        decode_bytes(path, data, max_pixels)
    except BadImageError as e:
        problem = e.reason
    del data
    try:
        after = os.stat(path)
    except (OSError, ValueError):
        return problem, None, digest
    stable = (
        before is not None
        and stat_row(before) == stat_row(after)
        and stat.S_ISREG(after.st_mode)
        and now_ns - after.st_mtime_ns >= RACY_NS
        and (problem is None or "out of memory" not in problem)
    )
    return problem, (stat_row(after) if stable else None), digest


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
