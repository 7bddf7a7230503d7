"""Which image files are the same: one file under several names, or the same bytes.

Splits use this to keep duplicates on one side (a test image must never also be a training
image), and `data check` / training use it to report a given split that shares files.

Cost stays linear in the number of images: one `os.stat` per file gives its identity (device
and inode: symlinks, hard links and `a/../a` spellings of one file) and its size; only files
whose size another file shares are read and hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lookcloser.data.table import sample_paths

_CHUNK = 1 << 20
SHOWN = 5  # files named in a one-line report; the rest are counted


def normal_path(path: str | os.PathLike) -> str:
    """A path in comparable form: user-expanded, absolute, normalised (no file system access)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def file_keys(
    paths: Iterable[str],
    sides: Sequence[Hashable] | None = None,
    content: bool = True,
    known: Callable[[str], str | None] | None = None,
) -> dict[str, Hashable]:
    """A key per path, equal for paths that name the same file or files with the same bytes.

    Files that cannot be read keep a key of their own path. With `sides` (one per path, e.g.
    the split of each), only files of equal size on different sides are hashed: enough to
    find what two splits share, and far less reading than hashing every equal-size group.
    `known(path)` may give a file's digest without reading it (the image verification cache,
    data/verify_cache.py: the same BLAKE2b-160 of the unchanged file), else None.
    """
    paths = list(paths)
    sides_of_path: dict[str, set] = defaultdict(set)
    for path, side in zip(paths, sides if sides is not None else [None] * len(paths), strict=True):
        sides_of_path[path].add(side)
    keys: dict[str, Hashable] = {}
    inode_of: dict[str, tuple[int, int]] = {}
    by_size: dict[int, dict[tuple[int, int], str]] = defaultdict(dict)  # size -> inode -> path
    sides_of_inode: dict[tuple[int, int], set] = defaultdict(set)
    for path in paths:
        if path in keys or path in inode_of:
            continue
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # missing, unreadable, or an invalid name
            keys[path] = ("path", normal_path(path))
            continue
        inode = (st.st_dev, st.st_ino)
        inode_of[path] = inode
        by_size[st.st_size].setdefault(inode, path)
        sides_of_inode[inode] |= sides_of_path[path]
    # inode -> the key of its content where another file of its size has the same bytes.
    same_bytes: dict[tuple[int, int], Hashable] = {}
    if content:
        for size, inodes in by_size.items():
            if len(inodes) < 2:
                continue
            if sides is not None and len(set().union(*(sides_of_inode[i] for i in inodes))) < 2:
                continue
            groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for inode, path in inodes.items():
                digest = (known(path) if known is not None else None) or _digest(path)
                if digest is not None:
                    groups[digest].append(inode)
            for digest, group in groups.items():
                if len(group) >= 2:
                    for inode in group:
                        same_bytes[inode] = ("bytes", size, digest)
    for path, inode in inode_of.items():
        keys[path] = same_bytes.get(inode, ("file", *inode))
    return keys


def _digest(path: str) -> str | None:
    try:
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


@dataclass
class SplitOverlap:
    """Files that two splits share: `pairs` of (path in the first split, path in the second)."""

    first: str
    second: str
    pairs: list[tuple[str, str]]

    @property
    def count(self) -> int:
        """How many files of the second split are also in the first."""
        return len(self.pairs)

    def describe(self, shown: int = SHOWN) -> str:
        """One line: the splits, the count and the first few files."""
        names = [a if a == b else f"{a} == {b}" for a, b in self.pairs[:shown]]
        more = f", and {self.count - shown} more" if self.count > shown else ""
        return (
            f"{self.first} and {self.second} share {self.count} image(s) (same file or same "
            f"bytes): {', '.join(names)}{more}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "splits": [self.first, self.second],
            "count": self.count,
            "files": [list(pair) for pair in self.pairs],
        }


def split_overlaps(
    splits: dict[str, Sequence[Any]],
    content: bool = True,
    known: Callable[[str], str | None] | None = None,
) -> list[SplitOverlap]:
    """What each pair of splits (name -> samples with `.path`) shares, train/test first.

    Checked: train-test, val-test and train-val, by file identity and (with `content`) bytes
    (`known`: digests already known, as for `file_keys`).
    """
    names = [n for n in ("train", "val", "test") if splits.get(n)]
    # Each split's paths read once (a SampleTable builds them, without building samples).
    split_paths = {n: list(sample_paths(splits[n])) for n in names}
    paths = [p for n in names for p in split_paths[n]]
    sides = [n for n in names for _ in split_paths[n]]
    keys = file_keys(paths, sides, content, known)
    first_path: dict[str, dict[Hashable, str]] = {
        n: {keys[p]: p for p in reversed(split_paths[n])} for n in names
    }
    overlaps = []
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        if a not in first_path or b not in first_path:
            continue
        seen, pairs = set(), []
        for path in split_paths[b]:
            key = keys[path]
            if key in first_path[a] and key not in seen:
                seen.add(key)
                pairs.append((first_path[a][key], path))
        if pairs:
            overlaps.append(SplitOverlap(a, b, pairs))
    return overlaps
