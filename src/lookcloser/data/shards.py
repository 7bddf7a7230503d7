"""WebDataset tar shards: pack any source into shards, stream them for large-scale training.

A shard is a plain tar in WebDataset layout: the files of one sample are consecutive and share
a key (`<key>.jpg`, `<key>.cls`, `<key>.json`). `dataset.json` beside the shards lists the
classes, the shards of each split and their sample counts, so training never lists files or
holds a per-sample index in memory: `ShardDataset` streams tar files one after another (local
paths or http(s) URLs), split across DDP ranks and DataLoader workers.

Written with the standard library's tarfile rather than the `webdataset` package: the format
is simple, the rank/worker split must be explicit and testable, and an equal per-rank length
(which DDP needs to avoid a hang) is easier to guarantee in our own loop. The shards remain
readable by `webdataset` itself.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image

from lookcloser.data.images import DEFAULT_MAX_PIXELS, decode_bytes, load_image
from lookcloser.data.info import count_summary
from lookcloser.data.meta import meta_tensors
from lookcloser.data.samples import root_folder
from lookcloser.data.sources import DatasetSplits, numeric_meta_keys
from lookcloser.errors import BadImageError, DataError
from lookcloser.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "lookcloser-shards/1"
INDEX_NAME = "dataset.json"
IMAGE_EXTS = ("jpg", "png", "webp", "jpeg", "ppm", "bmp", "gif", "tif", "tiff")
_SUFFIX_EXT = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
_TIMEOUT_S = 60


# ---- packing ------------------------------------------------------------------------------
def pack_shards(
    splits: DatasetSplits,
    out_dir: str | Path,
    shard_size: int,
    reencode: bool = False,
    *,
    seed: int = 0,
    quality: int = 95,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[str, int, int], None] | None = None,
    root: str | Path | None = None,
) -> list[Path]:
    """Write `{train,val,test}-NNNNNN.tar` shards of `shard_size` samples and `dataset.json`.

    A val split is written when `splits` has one (the source's own, or one carved for training).

    Image bytes are copied as they are, or with `reencode` decoded and saved as JPEG
    (`quality`, longest side at most `max_side`). Training samples are shuffled (seeded) so
    that a small shuffle buffer suffices when streaming. Each shard is written to a
    temporary name beside it and renamed when complete; `dataset.json` is written last.

    Each sample's record keeps the file it came from (`source`) and its path relative to
    `root`, the source's data.root (`path`; default: the folder all samples share), so that
    runs on the shards and runs on the files compare image by image.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size: expected a positive number of samples, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists() or any(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        raise DataError(f"{out}: already holds shards; choose an empty folder")
    every = [s.path for part in (splits.train, splits.val, splits.test) for s in part]
    base = _packed_root(root, every)
    index: dict[str, Any] = {
        "format": FORMAT,
        "name": splits.name,
        "classes": list(splits.classes),
        "annotations": list(splits.annotations),
        # What each record's `path` is relative to, and whether images were re-encoded.
        "root": base,
        "reencoded": bool(reencode),
        "splits": {},
    }
    written: list[Path] = []
    parts = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    for split, samples in [(name, samples) for name, samples in parts if samples or name != "val"]:
        order = list(range(len(samples)))
        if split == "train":
            random.Random(seed).shuffle(order)
        names, counts = [], []
        for start in range(0, len(order), shard_size):
            chunk = order[start : start + shard_size]
            path = out / f"{split}-{len(names):06d}.tar"
            _write_shard(
                path,
                split,
                [(i, samples[i]) for i in chunk],
                splits.classes,
                reencode,
                quality,
                max_side,
                max_pixels,
                base,
            )
            names.append(path.name)
            counts.append(len(chunk))
            written.append(path)
            if progress is not None:
                progress(split, start + len(chunk), len(order))
        class_counts = Counter(s.label for s in samples)
        index["splits"][split] = {
            "count": len(samples),
            "meta_keys": numeric_meta_keys(samples),
            "shards": names,
            "shard_counts": counts,
            "class_counts": [class_counts.get(i, 0) for i in range(len(splits.classes))],
        }
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return written


def _write_shard(
    path: Path,
    split: str,
    items: list[tuple[int, Any]],
    classes: list[str],
    reencode: bool,
    quality: int,
    max_side: int | None,
    max_pixels: int,
    base: str,
) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, sample in items:
            key = f"{split}_{i:09d}"
            ext, data = _image_bytes(sample.path, reencode, quality, max_side, max_pixels)
            record = {
                "label": sample.label,
                "class": classes[sample.label],
                "source": str(sample.path),
                "path": _relative(sample.path, base),
                "meta": sample.meta,
            }
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.cls", str(sample.label).encode())
            _add(tar, f"{key}.json", json.dumps(record, default=_jsonable).encode())


def _packed_root(root: str | Path | None, paths: list[str]) -> str:
    """The absolute folder that records' `path` is relative to: the source's root folder, else
    the folder every sample shares ("" if none)."""
    if root:
        return os.path.abspath(root_folder(root))
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    except ValueError:  # paths on different drives
        return ""
    return os.path.dirname(common) if len(paths) == 1 else common


def _relative(path: str, base: str) -> str:
    """`path` relative to `base`, '/'-separated; its absolute path where it is not under it."""
    full = os.path.abspath(path)
    if base:
        relative = os.path.relpath(full, base)
        if relative != ".." and not relative.startswith(".." + os.sep):
            return relative.replace(os.sep, "/")
    return full


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed fields: reproducible shards
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(
    path: str, reencode: bool, quality: int, max_side: int | None, max_pixels: int
) -> tuple[str, bytes]:
    if reencode:
        image = load_image(path, max_pixels)
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return "jpg", buffer.getvalue()
    ext = _SUFFIX_EXT.get(Path(path).suffix.lower())
    if ext is None:
        raise DataError(f"{path}: cannot copy this image format into a shard; use --reencode")
    try:
        return ext, Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read: {err.strerror or err}") from None


def _jsonable(value: Any) -> Any:
    # numpy scalars and arrays from .mat files, paths and the like.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ---- the index ----------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """What `dataset.json` says about a set of shards: classes, and shard URLs per split."""

    classes: list[str]
    urls: dict[str, list[str]]
    counts: dict[str, int | None]
    name: str = ""
    annotations: list[str] = field(default_factory=list)
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    # Numeric meta keys of the training split (what `data.meta_keys` may declare).
    meta_keys: list[str] = field(default_factory=list)
    # Samples per shard URL as dataset.json records them (checked while streaming).
    shard_counts: dict[str, int] = field(default_factory=dict)
    # Where the index was read from, for messages.
    index_url: str = ""
    # The folder the records' relative `path`s start from ("": packed before they were kept).
    root: str = ""
    # Whether the images were re-encoded when packed (None: not recorded).
    reencoded: bool | None = None


def open_shards(root: str) -> ShardIndex:
    """Read the shard index for `data.root`: a folder or URL holding dataset.json, that file,
    or a brace/glob pattern of training shards next to it (`.../train-{000000..000099}.tar`).
    """
    if not root:
        raise DataError("data.root is required for data.source=shards")
    is_pattern = root.endswith(".tar") or any(c in root for c in "{*?[")
    if is_pattern:
        base = root.rsplit("/", 1)[0] if "/" in root else "."
        index_url = f"{base}/{INDEX_NAME}"
    elif root.endswith(".json"):
        index_url, base = root, root.rsplit("/", 1)[0] if "/" in root else "."
    else:
        base = root.rstrip("/")
        index_url = f"{base}/{INDEX_NAME}"
    try:
        with _open_stream(index_url) as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"data.root: cannot read the shard index {index_url} ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise DataError(f"{index_url}: not a lookcloser shard index (format {found!r})")
    classes, entries = _checked_index(raw, index_url)
    urls, counts, class_counts, shard_counts = {}, {}, {}, {}
    for split, entry in entries.items():
        urls[split] = [f"{base}/{name}" for name in entry["shards"]]
        counts[split] = entry["count"]
        class_counts[split] = entry.get("class_counts", [])
        shard_counts.update(zip(urls[split], entry["shard_counts"], strict=True))
    if is_pattern:
        chosen = expand_urls(root)
        if not chosen:
            raise DataError(f"data.root: the pattern {root} matches no shard")
        urls["train"] = chosen
        known = all(u in shard_counts for u in chosen)
        counts["train"] = sum(shard_counts[u] for u in chosen) if known else None
        class_counts["train"] = []
    _check_local_shards(urls, index_url)
    meta_keys = entries.get("train", {}).get("meta_keys", [])
    return ShardIndex(
        classes,
        urls,
        counts,
        raw.get("name", ""),
        raw.get("annotations", []),
        class_counts,
        meta_keys,
        shard_counts,
        index_url,
        raw.get("root") if isinstance(raw.get("root"), str) else "",
        raw.get("reencoded") if isinstance(raw.get("reencoded"), bool) else None,
    )


def _checked_index(raw: dict, index_url: str) -> tuple[list[str], dict[str, dict]]:
    """The classes and split entries of a dataset.json, each field checked (DataError naming
    the file, the key and what is wrong), the count against the per-shard counts."""
    classes, splits = raw.get("classes"), raw.get("splits")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{index_url}: 'classes' must be a list of class names")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{index_url}: 'splits' must map split names to their shards")
    for split, entry in splits.items():
        where = f"{index_url}: splits.{split}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with count, shards and shard_counts")
        count, shards, per_shard = (
            entry.get("count"),
            entry.get("shards"),
            entry.get("shard_counts"),
        )
        if not isinstance(shards, list) or not all(isinstance(n, str) for n in shards):
            raise DataError(f"{where}.shards: expected a list of shard file names")
        if not _is_count(count):
            raise DataError(f"{where}.count: expected a number of samples, got {count!r}")
        if (
            not isinstance(per_shard, list)
            or len(per_shard) != len(shards)
            or not all(_is_count(n) for n in per_shard)
        ):
            raise DataError(
                f"{where}.shard_counts: expected one number of samples per shard "
                f"({len(shards)}), got {per_shard!r}"
            )
        if sum(per_shard) != count:
            raise DataError(
                f"{where}: count is {count}, but its shards hold {sum(per_shard)} samples "
                "(shard_counts); the index does not match its shards"
            )
    return classes, splits


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_local_shards(urls: dict[str, list[str]], index_url: str) -> None:
    """DataError naming the shards the index lists that are not on disk (URLs are not probed)."""
    missing = [
        u for names in urls.values() for u in names if not _is_url(u) and not os.path.isfile(u)
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"{index_url}: {len(missing)} listed shard(s) missing: {', '.join(missing[:3])}{more}"
        )


def shard_info(index: ShardIndex) -> dict[str, Any]:
    """The `data info` summary of a shard index (same shape as `info.dataset_info`)."""
    splits = {}
    for split, total in index.counts.items():
        counts = dict(enumerate(index.class_counts.get(split) or []))
        splits[split] = count_summary(total or 0, counts, len(index.classes) if counts else 0)
    return {
        "name": index.name,
        "num_classes": len(index.classes),
        "classes": index.classes,
        "splits": splits,
        "annotations": index.annotations,
    }


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand `{000000..000099}` ranges and `{a,b}` lists; glob local wildcards."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            first, last = numeric.groups()
            width = len(first) if first.startswith("0") else 0
            options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
        else:
            options = body.split(",")
        return [url for option in options for url in expand_urls(head + option + tail)]
    if not _is_url(pattern) and any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern]


def _is_url(name: str) -> bool:
    return urllib.parse.urlsplit(name).scheme in ("http", "https", "file")


def _open_stream(url: str) -> IO[bytes]:
    if _is_url(url):
        request = urllib.request.Request(url, headers={"User-Agent": "lookcloser"})
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)  # noqa: S310
    return open(url, "rb")  # noqa: SIM115 (the caller closes it)


# ---- streaming ----------------------------------------------------------------------------
def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's DDP rank and world size: explicit values, torch.distributed, or the
    RANK / WORLD_SIZE environment variables that torchrun sets; (0, 1) outside DDP."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _split(items: list[str], stride: int, offset: int, part: int, parts: int):
    # Give each of `parts` readers whole shards when there are enough, else every parts-th
    # sample of the stream (stride/offset select samples by position).
    if stride == 1 and len(items) >= parts:
        return items[part::parts], 1, 0
    return items, stride * parts, offset + stride * part


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams samples from tar shards, split across DDP ranks and then DataLoader workers.

    Yields `(image, label)`; with `meta_keys`, `(image, label, meta values, meta mask)` like
    the in-memory `ImageDataset` (K floats, 0 where missing, and K booleans); with
    `with_meta`, `(image, label, meta dict)`. `image` is the RGB PIL image passed through
    `transform`. With `with_name`, each tuple ends with the sample's name (`sample_name`).

    With `training` (the default) the shard order is reshuffled each epoch (`set_epoch`,
    shared with running DataLoader workers), samples pass a shuffle buffer of
    `shuffle_buffer`, and every rank yields exactly `len(self)` samples: `num_samples //
    world_size`, rounded down to whole batches when `batch_size` is given (each worker then
    yields whole batches), cycling through the rank's shards if they run short, so DDP ranks
    take the same number of steps. Without `training`, every sample is yielded exactly once
    across all ranks and workers, in shard order.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        num_samples: int | None = None,
        training: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        batch_size: int | None = None,
        meta_keys: list[str] | None = None,
        with_meta: bool = False,
        with_name: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_bad_image: str = "error",
        rank: int | None = None,
        world_size: int | None = None,
        shard_counts: dict[str, int] | None = None,
        num_classes: int | None = None,
        index_url: str = INDEX_NAME,
    ):
        super().__init__()
        if not urls:
            raise DataError("data.root: no shards to stream")
        if training and num_samples is None:
            raise DataError("ShardDataset: training needs num_samples (dataset.json has it)")
        self.urls = list(urls)
        self.num_samples = num_samples
        self.training = training
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.transform = transform
        self.batch_size = batch_size
        self.meta_keys = list(meta_keys) if meta_keys is not None else None
        self.with_meta = with_meta
        self.with_name = with_name
        self.max_pixels = max_pixels
        self.on_bad_image = on_bad_image
        self.rank, self.world_size = rank, world_size
        # What the index says each shard holds, checked as each shard is read to its end.
        self.shard_counts = dict(shard_counts or {})
        self.num_classes = num_classes
        self.index_url = index_url
        # Shared memory, so persistent DataLoader workers see set_epoch from the main process.
        self._epoch = multiprocessing.RawValue("q", 0)

    @classmethod
    def from_index(cls, index: ShardIndex, split: str, **kwargs: Any) -> ShardDataset:
        """The dataset of one split of a shard index; training mode for "train"."""
        if split not in index.urls:
            raise DataError(f"shard index has no {split!r} split; has {sorted(index.urls)}")
        kwargs.setdefault("training", split == "train")
        kwargs.setdefault("shard_counts", index.shard_counts)
        kwargs.setdefault("num_classes", len(index.classes))
        kwargs.setdefault("index_url", index.index_url or INDEX_NAME)
        return cls(index.urls[split], num_samples=index.counts.get(split), **kwargs)

    @property
    def epoch(self) -> int:
        """The epoch whose shard order and shuffle the next iteration uses."""
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order and buffer for `epoch` (call before each epoch)."""
        self._epoch.value = epoch

    def _units(self, world: int) -> tuple[int, int]:
        # (units per rank, samples per unit): whole batches when batch_size is known.
        per_rank = self.num_samples // world
        unit = self.batch_size or 1
        return per_rank // unit, unit

    def __len__(self) -> int:
        _, world = rank_and_world(self.rank, self.world_size)
        if self.num_samples is None or (not self.training and world > 1):
            raise TypeError("the per-rank length of this shard stream is not known in advance")
        if not self.training:
            return self.num_samples
        units, unit = self._units(world)
        return units * unit

    def batch_count(self, batch_size: int, workers: int) -> int | None:
        """How many batches a DataLoader with `workers` workers makes of this evaluation
        stream (None when not known in advance: training, DDP, or a shard without a count).
        Each worker batches its own share, so the partial batches add up: 8 images in 2
        shards read by 2 workers are 2 batches, not the len(DataLoader) of 1."""
        rank, world = rank_and_world(self.rank, self.world_size)
        if self.training or world > 1 or any(u not in self.shard_counts for u in self.urls):
            return None
        readers = max(workers, 1)
        shards, stride, offset = _split(list(self.urls), 1, 0, rank, world)
        total = 0
        for worker in range(readers):
            mine, step, first = _split(shards, stride, offset, worker, readers)
            samples = len(range(first, sum(self.shard_counts[u] for u in mine), step))
            total += -(-samples // batch_size)
        return total

    def __iter__(self) -> Iterator[tuple]:
        rank, world = rank_and_world(self.rank, self.world_size)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        shards = list(self.urls)
        if self.training:
            random.Random(f"{self.seed}-{epoch}").shuffle(shards)  # same order on all ranks
        shards, stride, offset = _split(shards, 1, 0, rank, world)
        shards, stride, offset = _split(shards, stride, offset, worker, workers)
        if not self.training:
            yield from self._decoded(self._pass(shards, stride, offset))
            return
        units, unit = self._units(world)
        quota = (units // workers + (1 if worker < units % workers else 0)) * unit
        rng = random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")
        decoded = self._decoded(self._passes(shards, stride, offset, rng))
        for _ in range(quota):
            yield next(decoded)

    def _passes(
        self, shards: list[str], stride: int, offset: int, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        # Endless passes over this reader's shards, each through its own shuffle buffer, so
        # a pass is complete before any sample repeats.
        while True:
            stream = self._pass(shards, stride, offset)
            if self.shuffle_buffer > 1:
                stream = _shuffled(stream, self.shuffle_buffer, rng)
            found = False
            for sample in stream:
                found = True
                yield sample
            if not found:
                raise DataError(f"shards {shards[:3]}: no samples for this reader")
            rng.shuffle(shards)

    def _pass(self, shards: list[str], stride: int, offset: int) -> Iterator[dict[str, Any]]:
        position = 0
        for url in shards:
            found = 0
            for sample in iter_tar_samples(url):
                if position % stride == offset:
                    yield sample
                position += 1
                found += 1
            expected = self.shard_counts.get(url)
            if expected is not None and found != expected:
                # A count that does not match would make training cycle or cut the data while
                # recording the wrong number of samples.
                raise DataError(
                    f"{url}: holds {found} samples, but {self.index_url} records {expected}; "
                    "the index does not match its shards (pack them again)"
                )

    def _decoded(self, stream: Iterator[dict[str, Any]]) -> Iterator[tuple]:
        for sample in stream:
            try:
                image, label, meta = decode_sample(sample, self.max_pixels, self.num_classes)
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise
                log.warning("data.on_bad_image=skip: skipping %s", err)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.meta_keys is not None:
                values, mask = meta_tensors([meta], self.meta_keys, [_where(sample)])
                item: tuple = (image, label, values[0], mask[0])
            elif self.with_meta:
                item = (image, label, meta)
            else:
                item = (image, label)
            yield (*item, sample_name(sample)) if self.with_name else item


def _shuffled(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one WebDataset tar, in order: dicts of extension -> bytes, plus `__key__`
    and `__url__` (the shard). A shard that cannot be opened or read is a DataError naming
    it and the last sample read."""
    try:
        stream = _open_stream(url)
    except OSError as err:
        raise DataError(f"{url}: cannot open shard ({err})") from None
    current: dict[str, Any] = {}
    last = "its first sample"
    with stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (closed below)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{url}: not a readable tar shard ({err})") from None
        with tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    if current and current["__key__"] != key:
                        last = f"sample {current['__key__']}"
                        yield current
                        current = {}
                    current["__key__"], current["__url__"] = key, url
                    current[ext.lower()] = tar.extractfile(member).read()
                    tar.members = []  # streaming: keep no history
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                at = f"in sample {current['__key__']}" if current else f"after {last}"
                raise DataError(f"{url}: corrupt or truncated shard ({at}: {err})") from None
    if current:
        yield current


def _record(sample: dict[str, Any]) -> dict[str, Any]:
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def sample_name(sample: dict[str, Any]) -> str:
    """The name a streamed sample is known by: its record's `path` (relative to the packed
    root), else the file it was packed from (`source`), else `<shard>#<key>`."""
    record = _record(sample)
    for field_name in ("path", "source"):
        if isinstance(record.get(field_name), str) and record[field_name]:
            return record[field_name]
    return f"{sample.get('__url__', '')}#{sample['__key__']}"


@dataclass
class ShardRecord:
    """One packed sample as its shard lists it, without decoding the image."""

    name: str  # sample_name
    label: int | None  # None: no valid .cls
    url: str
    key: str
    recorded: bool  # `name` is the packer's relative path (not a source file or a key)
    digest: str  # sha256 of the image bytes ("" without an image)


def shard_records(index: ShardIndex, split: str) -> Iterator[ShardRecord]:
    """The samples of one split in shard order, read from their .cls and .json files (the
    image bytes are hashed, not decoded): a listing as cheap as reading the shards once."""
    import hashlib

    for url in index.urls.get(split, []):
        for sample in iter_tar_samples(url):
            text = sample.get("cls", b"").decode("utf-8", "replace").strip()
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            yield ShardRecord(
                sample_name(sample),
                int(text) if re.fullmatch(r"[0-9]+", text) else None,
                url,
                sample["__key__"],
                isinstance(_record(sample).get("path"), str),
                hashlib.sha256(sample[ext]).hexdigest() if ext else "",
            )


def _where(sample: dict[str, Any]) -> str:
    url = sample.get("__url__")
    return f"{url}: sample {sample['__key__']}" if url else f"shard sample {sample['__key__']}"


def decode_sample(
    sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS, num_classes: int | None = None
) -> tuple:
    """(RGB image, label, meta) of one streamed sample; BadImageError for undecodable images,
    DataError naming the shard and sample for a missing or invalid label or record."""
    key, where = sample["__key__"], _where(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"{where}: no image file ({', '.join(IMAGE_EXTS)})")
    if "cls" not in sample:
        raise DataError(f"{where}: no .cls label file")
    text = sample["cls"].decode("utf-8", "replace").strip()
    label = int(text) if re.fullmatch(r"[0-9]+", text) else None
    if label is None or (num_classes is not None and label >= num_classes):
        valid = f"0..{num_classes - 1}" if num_classes else "a non-negative integer"
        raise DataError(f"{where}: {key}.cls must be a class index ({valid}), got {text[:40]!r}")
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: {key}.json is not valid JSON ({err})") from None
    meta = record.get("meta", {}) if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: {key}.json: 'meta' must be an object")
    url = sample.get("__url__")
    name = f"{url} ({key}.{ext})" if url else f"{key}.{ext}"
    image, _ = decode_bytes(name, sample[ext], max_pixels)
    return image, label, meta
