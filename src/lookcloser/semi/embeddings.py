"""Embeddings of a round, cached on disk: a safetensors tensor and a JSON key beside it.

The key names what the embeddings depend on (the model's weights or config, the transform,
the image paths); a later run, or a resumed one, reuses the file when the key matches and
recomputes it otherwise. No pickle: tensors in safetensors, everything else in JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from lookcloser.fileio import atomic_write_bytes, atomic_write_text


def cache_key(**parts) -> str:
    """A short hash of JSON-able parts (model identity, transform settings, paths)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_embeddings(
    path: Path, key: str, compute: Callable[[], Tensor], log: Callable[[str], None] = print
) -> Tensor:
    """The embeddings stored at `path` under `key`, else `compute()`d and stored."""
    from safetensors.torch import load_file, save

    meta = path.with_suffix(".json")
    try:
        if json.loads(meta.read_text()).get("key") == key and path.is_file():
            log(f"reusing cached embeddings {path}")
            return load_file(str(path))["embeddings"]
    except (OSError, ValueError):
        pass
    embeddings = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialized here and written from Python: a full disk is a WriteError naming the file.
    atomic_write_bytes(path, save({"embeddings": embeddings.contiguous()}))
    # The key last: a file without its key (an interrupted write) is recomputed.
    atomic_write_text(meta, json.dumps({"key": key, "count": len(embeddings)}) + "\n")
    return embeddings
