"""What verifying an image found, remembered: a folder's second start decodes nothing.

Verification (data/images.py `verify_samples`) decodes every image before training. Its
verdicts are kept here, one file per folder (the common folder of the images) and decoder
settings, under `$LOOKCLOSER_CACHE/verify`, else `$XDG_CACHE_HOME/lookcloser/verify`, else
`~/.cache/lookcloser/verify`. An entry is keyed by the path and the file's device, inode,
size and modification time (ns): a file changed in any of them is verified again. It holds
the verdict (the reason for a bad image, so a bad image stays bad with the same report) and a
BLAKE2b digest of the bytes, which lets duplicate detection (data/duplicates.py) skip reading
files again.

The file is untrusted input: a NumPy .npz of plain arrays read with allow_pickle=False (never
unpickled), whose members must be stored uncompressed (no zip bomb), with the expected
dtypes and shapes, a SHA-256 of its arrays and the settings it was made with. Anything else
is ignored with a warning and rebuilt. It is written atomically (lookcloser.fileio); two
processes writing at once each leave a whole file, the last one wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.data.duplicates import normal_path
from lookcloser.fileio import WriteError, atomic_open, cache_root

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the file's layout changes
DIGEST_SIZE = 20  # BLAKE2b-160, as data/duplicates.py hashes files
# A file modified less than this before it was verified may change again within the same
# timestamp tick (coarse file systems: 1-2 s); its verdict is not kept (git's "racy" rule).
RACY_NS = 2_000_000_000
MAX_AGE_S = 30 * 24 * 3600  # entries (and cache files) unused this long are dropped
_TOUCH_S = 24 * 3600  # a used cache file's mtime is refreshed at most this often
_COLUMNS = {  # name -> dtype of the per-entry arrays
    "key": np.uint64,
    "dev": np.int64,  # device and inode numbers cut to 63 bits
    "ino": np.int64,
    "size": np.int64,
    "mtime": np.int64,
    "seen": np.int64,  # when the entry was last used (s since the epoch)
    "problem": np.int32,  # -1: the image is fine; else an index into the problem texts
}
_MASK = 2**63 - 1  # device and inode numbers are unsigned 64-bit; the columns are int64
_ARRAYS = (*_COLUMNS, "digest", "problem_offsets", "problem_text", "settings", "checksum")


def cache_dir() -> Path:
    """Where verdicts are kept: `verify` under lookcloser's cache folder
    (`fileio.cache_root`: $LOOKCLOSER_CACHE, else $XDG_CACHE_HOME/lookcloser, else
    ~/.cache/lookcloser)."""
    return cache_root() / "verify"


def path_key(path: str) -> int:
    """A 64-bit key of a path as written. An entry is used only when the file's device and
    inode match too, so a collision (or a relative path read from another folder) costs a
    miss at worst, never another file's verdict."""
    data = path.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def stat_row(st: os.stat_result) -> tuple[int, int, int, int]:
    """What an entry matches a file by besides its path: (device, inode, size, mtime_ns)."""
    return (st.st_dev & _MASK, st.st_ino & _MASK, st.st_size, st.st_mtime_ns)


def common_folder(folders: Iterable[str]) -> str:
    """The deepest folder holding every one of `folders` (normalised)."""
    normal = {normal_path(f or ".") for f in folders}
    if not normal:
        return normal_path(".")
    try:
        return os.path.commonpath(sorted(normal))
    except ValueError:  # different drives (Windows)
        return ""


class VerifyCache:
    """The verdicts kept for one folder and decoder settings: look up, record, save."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        self.settings = settings
        self._settings_bytes = json.dumps(settings, sort_keys=True).encode()
        self.now = int(time.time())
        self._pending: list[dict[str, np.ndarray]] = []
        self._problem_index: dict[str, int] = {}
        self._changed = False  # whether the file must be written (new entries, or unreadable)
        self._load()

    # ---- reading ---------------------------------------------------------------------------
    def _empty(self) -> None:
        self.arrays = {name: np.zeros(0, dtype=dtype) for name, dtype in _COLUMNS.items()}
        self.arrays["digest"] = np.zeros((0, DIGEST_SIZE), dtype=np.uint8)
        self.problems: list[str] = []
        self._used = np.zeros(0, dtype=bool)

    def _load(self) -> None:
        self._empty()
        if not self.path.is_file():
            return
        try:
            arrays, problems = _read(self.path, self._settings_bytes)
        except (_Invalid, OSError, ValueError, MemoryError, zipfile.BadZipFile, EOFError) as err:
            log.warning(
                "%s: ignoring the image verification cache (%s); it is rebuilt", self.path, err
            )
            self._changed = True
            return
        self.arrays, self.problems = arrays, problems
        self._problem_index = {text: i for i, text in enumerate(problems)}
        self._used = np.zeros(len(arrays["key"]), dtype=bool)
        self._touch()

    def __len__(self) -> int:
        return len(self.arrays["key"])

    def lookup(
        self,
        keys: np.ndarray,
        dev: np.ndarray,
        ino: np.ndarray,
        size: np.ndarray,
        mtime: np.ndarray,
    ) -> np.ndarray:
        """The entry row of each file (-1 where none matches its path, inode, size, mtime)."""
        cached = self.arrays
        if not len(cached["key"]) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(cached["key"], keys), len(cached["key"]) - 1)
        hit = (
            (cached["key"][at] == keys)
            & (cached["dev"][at] == dev)
            & (cached["ino"][at] == ino)
            & (cached["size"][at] == size)
            & (cached["mtime"][at] == mtime)
        )
        self._used[at[hit]] = True
        return np.where(hit, at, -1)

    def problem(self, row: int) -> str | None:
        """The reason entry `row`'s image is unreadable, or None when it is fine."""
        index = int(self.arrays["problem"][row])
        return None if index < 0 else self.problems[index]

    def digest(self, path: str) -> str | None:
        """The BLAKE2b-160 hex digest of `path`'s bytes if its entry is current, else None."""
        # One path at a time (data/duplicates.py asks per file): scalar look-ups, no arrays.
        keys = self.arrays["key"]
        key = path_key(path)
        at = int(np.searchsorted(keys, np.uint64(key)))
        if at >= len(keys) or int(keys[at]) != key:
            return None
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        cached = tuple(int(self.arrays[name][at]) for name in ("dev", "ino", "size", "mtime"))
        if cached != stat_row(st):
            return None
        self._used[at] = True
        return self.arrays["digest"][at].tobytes().hex()

    # ---- recording -------------------------------------------------------------------------
    def record(
        self,
        keys: np.ndarray,
        stats: np.ndarray,
        digests: np.ndarray,
        problems: list[str | None],
    ) -> None:
        """Keep new verdicts: `stats` rows (dev, ino, size, mtime_ns), digests N x 20."""
        if not len(keys):
            return
        codes = np.array([self._problem_code(p) for p in problems], dtype=np.int32)
        self._pending.append(
            {
                "key": np.asarray(keys, dtype=np.uint64),
                "dev": stats[:, 0].astype(np.int64),
                "ino": stats[:, 1].astype(np.int64),
                "size": stats[:, 2].astype(np.int64),
                "mtime": stats[:, 3].astype(np.int64),
                "seen": np.full(len(keys), self.now, dtype=np.int64),
                "problem": codes,
                "digest": np.asarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE),
            }
        )
        self._changed = True

    def _problem_code(self, problem: str | None) -> int:
        if problem is None:
            return -1
        if problem not in self._problem_index:
            self._problem_index[problem] = len(self.problems)
            self.problems.append(problem)
        return self._problem_index[problem]

    def commit(self) -> None:
        """Merge the recorded verdicts into the entries (new ones win), drop entries unused
        for MAX_AGE_S, and keep them sorted by key."""
        if not self._pending and not self._changed:
            return
        old = dict(self.arrays)
        old["seen"] = np.where(self._used, self.now, old["seen"])
        fresh = old["seen"] >= self.now - MAX_AGE_S
        parts = [{name: a[fresh] for name, a in old.items()}, *self._pending]
        merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        # Sort by key, the newest entry of a key last; keep that one.
        order = np.argsort(merged["key"], kind="stable")
        merged = {name: a[order] for name, a in merged.items()}
        keys = merged["key"]
        last = np.r_[keys[1:] != keys[:-1], True] if len(keys) else np.zeros(0, bool)
        merged = {name: a[last] for name, a in merged.items()}
        # Problem texts no entry refers to any more are dropped.
        used_codes = np.unique(merged["problem"][merged["problem"] >= 0])
        remap = np.full(len(self.problems) + 1, -1, dtype=np.int32)
        remap[used_codes] = np.arange(len(used_codes), dtype=np.int32)
        merged["problem"] = np.where(merged["problem"] >= 0, remap[merged["problem"]], -1).astype(
            np.int32
        )
        self.problems = [self.problems[i] for i in used_codes]
        self._problem_index = {text: i for i, text in enumerate(self.problems)}
        self.arrays = merged
        self._used = np.zeros(len(keys), dtype=bool)
        self._pending = []

    def save(self) -> None:
        """Write the entries if anything changed (atomically; a failure is only a warning)."""
        self.commit()
        if not self._changed:
            return
        arrays = dict(self.arrays)
        texts = [t.encode("utf-8", "surrogateescape") for t in self.problems]
        arrays["problem_offsets"] = np.cumsum([0, *map(len, texts)], dtype=np.int64)
        arrays["problem_text"] = np.frombuffer(b"".join(texts), dtype=np.uint8)
        arrays["settings"] = np.frombuffer(self._settings_bytes, dtype=np.uint8)
        arrays["checksum"] = np.frombuffer(_checksum(arrays), dtype=np.uint8)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.path, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: read back without inflating anything
        except (OSError, WriteError) as err:
            log.warning("%s: could not save the image verification cache (%s)", self.path, err)
            return
        self._changed = False
        _prune(self.path.parent)

    def _touch(self) -> None:
        # Cache files unused for MAX_AGE_S are pruned by age: mark this one as in use.
        with contextlib.suppress(OSError):
            if time.time() - self.path.stat().st_mtime > _TOUCH_S:
                os.utime(self.path)


def open_cache(folders: Iterable[str], settings: dict[str, Any]) -> VerifyCache | None:
    """The cache of the images under the common folder of `folders`, for these decoder
    `settings` (None, with a warning, when the cache folder cannot be used)."""
    folder = common_folder(folders)
    full = {"format": FORMAT, "folder": folder, **settings}
    name = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]
    try:
        return VerifyCache(cache_dir() / f"{name}.npz", full)
    except OSError as err:  # e.g. an unreadable cache folder
        log.warning("%s: image verification cache unusable (%s)", cache_dir(), err)
        return None


# ---- internals ------------------------------------------------------------------------------
class _Invalid(Exception):
    """A cache file that is not what this module writes."""


def _checksum(arrays: dict[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for name in _ARRAYS[:-1]:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.digest()


def _read(path: Path, settings: bytes) -> tuple[dict[str, np.ndarray], list[str]]:
    file_size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        names = sorted(m.filename for m in members)
        if names != sorted(f"{n}.npy" for n in _ARRAYS):
            raise _Invalid("unexpected members")
        for member in members:
            if member.compress_type != zipfile.ZIP_STORED or member.file_size > file_size:
                raise _Invalid(f"member {member.filename} is compressed or oversized")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in _ARRAYS}
    if arrays["settings"].dtype != np.uint8 or arrays["settings"].tobytes() != settings:
        raise _Invalid("made with other settings")
    if arrays["checksum"].dtype != np.uint8 or arrays["checksum"].tobytes() != _checksum(arrays):
        raise _Invalid("checksum mismatch")
    n = len(arrays["key"])
    for name, dtype in _COLUMNS.items():
        if arrays[name].dtype != dtype or arrays[name].shape != (n,):
            raise _Invalid(f"bad {name} array")
    if arrays["digest"].dtype != np.uint8 or arrays["digest"].shape != (n, DIGEST_SIZE):
        raise _Invalid("bad digest array")
    if n and not np.all(arrays["key"][1:] > arrays["key"][:-1]):
        raise _Invalid("keys not sorted")
    offsets, text = arrays.pop("problem_offsets"), arrays.pop("problem_text")
    if (
        offsets.dtype != np.int64
        or offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or np.any(np.diff(offsets) < 0)
        or offsets[-1] != len(text)
        or text.dtype != np.uint8
    ):
        raise _Invalid("bad problem texts")
    raw = text.tobytes()
    problems = [
        raw[a:b].decode("utf-8", "surrogateescape")
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    ]
    codes = arrays["problem"]
    if n and (codes.min() < -1 or codes.max() >= len(problems)):
        raise _Invalid("bad problem index")
    del arrays["settings"], arrays["checksum"]
    return arrays, problems


def _prune(folder: Path) -> None:
    """Remove cache files (and temporary leftovers) unused for MAX_AGE_S."""
    limit = time.time() - MAX_AGE_S
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
