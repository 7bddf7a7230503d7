"""Every file lookcloser writes goes through here: a temporary file in the destination
folder, flushed to disk, then moved into place with `os.replace`.

So a reader (or a resumed run) never sees half a file, a kill at any moment leaves the old
file whole, a link at the destination is replaced rather than written through, and the
temporary file never crosses a filesystem (unlike Lightning's fsspec transaction, which
stages under $TMPDIR and copies when the run is on another filesystem). Files get the
user's umask, like any file `open()` makes. A full disk is an error naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lookcloser.errors import LookcloserError


class WriteError(LookcloserError):
    """A file could not be written (full disk, no permission); the message names it."""


# Errors of the write itself (others, e.g. a bad source file read inside the block, pass as is).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(path: Path, err: OSError) -> WriteError:
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif err.errno == errno.EDQUOT:
        reason = "disk quota exceeded"
    else:
        reason = err.strerror or str(err)
    return WriteError(f"{path}: could not write ({reason}; folder {path.parent})")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a library that writes by file name; on success it is
    fsynced and moved onto `path`, on failure removed (the old `path` is untouched)."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            raise _write_error(path, err) from err
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`open(path, mode)` on a temporary file that replaces `path` once closed without error
    (`mode` "w" or "wb"; `kwargs` as for `open`, e.g. newline="" or encoding)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def safe_name(text: str, limit: int = 64) -> str:
    """`text` (a class, member or image name: data) as part of one file name: path separators,
    control characters and `..` replaced, at most `limit` bytes of UTF-8 (names end at 255)."""
    text = re.sub(r"[\x00-\x1f\x7f/\\:]", "_", str(text)).replace("..", "__")
    text = text.encode("utf-8", "backslashreplace")[:limit].decode("utf-8", "ignore")
    return text if text not in ("", ".") else "_"


def cache_root() -> Path:
    """Where lookcloser keeps what it can rebuild (generated data, image verdicts):
    $LOOKCLOSER_CACHE, else $XDG_CACHE_HOME/lookcloser, else ~/.cache/lookcloser."""
    env = os.environ.get("LOOKCLOSER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "lookcloser"
