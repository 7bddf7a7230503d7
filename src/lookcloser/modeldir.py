"""The model directory: model.safetensors + model.json, written so a crash never looks done.

model.json is written last, atomically, and records the weights' SHA-256: a directory
without it (or whose weights do not match it) is not a model. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lookcloser.config import Config, DataConfig, check_field
from lookcloser.errors import ConfigError, LookcloserError, ModelDirError
from lookcloser.fileio import atomic_open, atomic_write_text  # noqa: F401  (re-exported)
from lookcloser.tta import TTA

FORMAT = "lookcloser.model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
ENSEMBLE_JSON = "ensemble.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a saved model."""
    import lightning
    import timm
    import torch

    from lookcloser import __version__

    return {
        "lookcloser": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
    }


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` holds a complete model (its model.json exists)."""
    return (Path(path) / MODEL_JSON).is_file()


def is_ensemble_dir(path: str | Path) -> bool:
    """Whether `path` holds an ensemble (its ensemble.json exists; see lookcloser.ensemble)."""
    return (Path(path) / ENSEMBLE_JSON).is_file()


def backup_path(path: Path) -> Path:
    """Where an overwritten run waits until the new run has its first checkpoint."""
    return path.parent / f".{path.name}.previous"


def backup_note(path: str | Path) -> str:
    """For messages about a folder without a model: where the run a killed overwrite moved
    aside waits, if there is one ("" otherwise)."""
    path = Path(path)
    backup = backup_path(path)
    if not backup.is_dir():
        return ""
    return (
        f"; the run it was replacing (overwrite=true) is kept at {backup}, and the next "
        f"train with out={path} puts it back unless the new run has a checkpoint"
    )


def invalidate(path: str | Path) -> None:
    """Mark a model directory incomplete before rewriting it."""
    (Path(path) / MODEL_JSON).unlink(missing_ok=True)


def save_model_dir(path: str | Path, state_dict: dict, info: dict[str, Any]) -> Path:
    """Write weights then model.json (last, atomically) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # Bytes written from Python (not safetensors' save_file): a full disk is then a WriteError
    # naming the file, and the old weights stay whole until the new ones are complete.
    with atomic_open(weights, "wb") as f:
        f.write(safetensors_bytes(tensors))
        f.flush()
        invalidate(path)  # the old model.json describes the old weights: it goes first
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **info,
        "weights": {
            "file": WEIGHTS,
            "sha256": file_sha256(weights),
            "bytes": weights.stat().st_size,
        },
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(path / MODEL_JSON, json.dumps(record, indent=2) + "\n")
    return path


# ---- reading: a model directory is untrusted input ------------------------------------------------
# A model.json of 10,000 classes is well under 1 MiB; a bigger one is not a model's.
MAX_JSON_BYTES = 16 << 20
# Interpolations timm's eval transform knows.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# safetensors' own limit on its JSON header.
MAX_HEADER_BYTES = 100 << 20

_TRUSTED: ContextVar[frozenset[str]] = ContextVar("lookcloser_trusted_modules", default=frozenset())


@contextmanager
def trusting_modules(names: Iterable[str] = ()) -> Iterator[frozenset[str]]:
    """Within the block, model directories may import these modules (their
    `config.method.module`): the user's opt-in, as `--trust-module NAME` on the command line."""
    token = _TRUSTED.set(_TRUSTED.get() | frozenset(names))
    try:
        yield _TRUSTED.get()
    finally:
        _TRUSTED.reset(token)


def trusted_modules(extra: Iterable[str] | None = ()) -> frozenset[str]:
    """The modules a model directory may import now: those of `trusting_modules` and `extra`."""
    return _TRUSTED.get() | frozenset(extra or ())


def read_json_file(file: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from a file of a model or ensemble directory, bounded in size and depth."""
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelDirError(
                f"{file}: {size} bytes, more than a {what or file.name} holds "
                f"(at most {MAX_JSON_BYTES >> 20} MiB)"
            )
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5,000-digit number
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ModelDirError(f"{file}: not valid JSON ({reason})") from None
    except OSError as err:
        raise ModelDirError(f"{file}: cannot be read ({err.strerror or err})") from None
    if not isinstance(record, dict):
        raise ModelDirError(f"{file}: expected a JSON object, got {type(record).__name__}")
    return record


def check_format(file: Path, record: dict[str, Any], fmt: str, version: int) -> None:
    """ModelDirError unless `record` is of format `fmt` and a version this lookcloser reads."""
    if record.get("format") != fmt:
        raise ModelDirError(f"{file}: format is {shorten(record.get('format'))}, expected {fmt!r}")
    found = record.get("format_version", 0)
    if not _is_int(found) or found < 0:
        raise ModelDirError(f"{file}: format_version: expected an integer, got {shorten(found)}")
    if found > version:
        raise ModelDirError(
            f"{file}: format_version {found} is newer than this lookcloser reads ({version}); "
            "upgrade lookcloser"
        )


def read_model_json(path: str | Path) -> dict[str, Any]:
    """The parsed model.json of a model directory, every field checked (types, ranges, the
    weights' file name; `config` as a config file is); `check_model_config` adds the checks
    that need its method (options, module trust)."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory")
    if not meta_path.is_file():
        raise ModelDirError(
            f"{path}: no {MODEL_JSON}; not a model directory, or its training did not finish"
            + backup_note(path)
        )
    record = read_json_file(meta_path, MODEL_JSON)
    check_format(meta_path, record, FORMAT, FORMAT_VERSION)
    for key in ("method", "classes", "preprocessing", "config", "weights"):
        if key not in record:
            raise ModelDirError(f"{meta_path}: missing field {key!r}")
    _check_record(meta_path, record)
    return record


def _check_record(meta_path: Path, record: dict[str, Any]) -> None:

    def fail(key: str, expected: str) -> ModelDirError:
        return ModelDirError(f"{meta_path}: {key}: expected {expected}, got {shorten(_get(key))}")

    def _get(key: str) -> Any:
        node: Any = record
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    if not isinstance(record["method"], str) or not record["method"]:
        raise fail("method", "a method name")
    for key in ("method_options", "config", "preprocessing", "weights"):
        if key in record and not isinstance(record[key], dict):
            raise fail(key, "a mapping")
    classes = record["classes"]
    if not isinstance(classes, list) or not classes:
        raise fail("classes", "a non-empty list of class names")
    if not all(isinstance(c, str) and c for c in classes):
        bad = next(c for c in classes if not isinstance(c, str) or not c)
        raise ModelDirError(f"{meta_path}: classes: expected names (strings), got {shorten(bad)}")
    if len(set(classes)) != len(classes):
        seen: set[str] = set()
        twice = next(c for c in classes if c in seen or seen.add(c))
        raise ModelDirError(f"{meta_path}: classes: {twice!r} is listed twice")
    keys = record.get("meta_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise fail("meta_keys", "a list of metadata key names")
    pre = record["preprocessing"]
    if "image_size" not in pre:
        raise ModelDirError(f"{meta_path}: missing field 'preprocessing.image_size'")
    where = str(meta_path)
    try:
        # The same types and ranges as the config keys they come from.
        check_field(DataConfig, "image_size", pre["image_size"], "preprocessing.image_size", where)
        if "crop_pct" in pre:
            pre["crop_pct"] = check_field(
                DataConfig, "crop_pct", pre["crop_pct"], "preprocessing.crop_pct", where
            )
    except ConfigError as err:
        raise ModelDirError(str(err)) from None
    if pre.get("interpolation", "bicubic") not in INTERPOLATIONS:
        raise fail("preprocessing.interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        values = pre.get(key, [0.5, 0.5, 0.5])
        if not (
            isinstance(values, list)
            and len(values) == 3
            and all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            raise fail(f"preprocessing.{key}", "3 numbers (one per RGB channel)")
    if "tta" in record:
        if not isinstance(record["tta"], str | None):
            raise fail("tta", "a test-time augmentation spec such as 'flip'")
        try:
            TTA.parse(record["tta"])
        except ConfigError as err:
            raise ModelDirError(f"{meta_path}: {err}") from None
    weights = record["weights"]
    for key in ("file", "sha256", "bytes"):
        if key not in weights:
            raise ModelDirError(f"{meta_path}: missing field 'weights.{key}'")
    check_file_name(meta_path, "weights.file", weights["file"])
    sha = weights["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise fail("weights.sha256", "64 hexadecimal digits")
    if not _is_int(weights["bytes"]) or weights["bytes"] < 0:
        raise fail("weights.bytes", "the size of the weights file in bytes")
    # The config's keys, types and ranges (no code is imported: see check_model_config).
    if _count_items(record["config"], MAX_CONFIG_ITEMS) > MAX_CONFIG_ITEMS:
        raise ModelDirError(f"{meta_path}: config: more than {MAX_CONFIG_ITEMS} values")
    try:
        Config.from_dict(record["config"], where=where)
    except LookcloserError as err:
        raise ModelDirError(in_file(meta_path, err)) from None


def check_file_name(json_file: Path, key: str, name: Any) -> None:
    """ModelDirError unless `name` is a plain file name (no folder, no `..`, not absolute):
    what a JSON file names is read from its own folder only."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
    ):
        raise ModelDirError(
            f"{json_file}: {key}: expected a file name inside {json_file.parent}, got {shorten(name)}"
        )


def check_inside(json_file: Path, key: str, target: Path) -> Path:
    """`target` resolved, or a ModelDirError if it (through links) lies outside the folder
    of `json_file`."""
    try:
        folder = json_file.parent.resolve()
        resolved = target.resolve()
    except (OSError, RuntimeError) as err:  # a link loop
        raise ModelDirError(f"{json_file}: {key}: {target} cannot be resolved ({err})") from None
    if resolved != folder and folder not in resolved.parents:
        raise ModelDirError(
            f"{json_file}: {key}: {target} leads outside {json_file.parent} (to {resolved}); "
            "a model directory's files must lie inside it"
        )
    return resolved


def weights_file(path: str | Path, record: dict[str, Any]) -> Path:
    """The weights file of a checked model.json record, after checking where it lies, its
    size and its SHA-256."""
    meta_path = Path(path) / MODEL_JSON
    weights = Path(path) / record["weights"]["file"]
    if not weights.is_file():
        raise ModelDirError(f"{weights}: missing")
    check_inside(meta_path, "weights.file", weights)
    size = weights.stat().st_size
    if size != record["weights"]["bytes"]:
        raise ModelDirError(
            f"{weights}: {size} bytes, but model.json records weights.bytes="
            f"{record['weights']['bytes']} (corrupt or replaced)"
        )
    if file_sha256(weights) != record["weights"]["sha256"]:
        raise ModelDirError(f"{weights}: SHA-256 does not match model.json (corrupt or replaced)")
    return weights


def weights_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone
    (bounded: a header claiming more bytes than the file holds is refused before parsing)."""
    from safetensors import SafetensorError, safe_open

    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ModelDirError(f"{weights}: not a safetensors file ({size} bytes, no header)")
    length = int.from_bytes(head, "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise ModelDirError(
            f"{weights}: not a safetensors file (its header claims {length} bytes; the file "
            f"holds {size})"
        )
    try:
        with safe_open(str(weights), "pt") as f:
            return {
                name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                for name in f.keys()  # noqa: SIM118 (safe_open is no mapping)
            }
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"{weights}: not a readable safetensors file ({err})") from None


def read_weights(path: str | Path, record: dict[str, Any]) -> dict:
    """The weights of a model directory, after checking them against model.json."""
    weights = weights_file(path, record)
    weights_header(weights)
    return load_weights_file(weights)


def load_weights_file(weights: Path) -> dict:
    """The tensors of a checked safetensors file (`weights_file`, `weights_header`)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, MemoryError) as err:
        raise ModelDirError(f"{weights}: not a readable safetensors file ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def shorten(value: Any) -> str:
    """repr(value), cut short: values of a tampered file can be huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# A config holds a few hundred values; more is not a config (and would cost memory to check).
MAX_CONFIG_ITEMS = 20_000


def check_module_trusted(meta_path: Path, module: Any, trust_modules=()) -> None:
    """ModelDirError unless the user trusts `module` (a model.json's config.method.module):
    a model directory never makes lookcloser import code by itself."""
    if isinstance(module, str) and module in trusted_modules(trust_modules):
        return
    name = module if isinstance(module, str) else "NAME"
    raise ModelDirError(
        f"{meta_path}: config.method.module={shorten(module)}: a model directory may not make "
        "lookcloser import a module (only methods built in or installed as `lookcloser.methods` "
        "entry points load from one). If you trust this model and that module, opt in with "
        f"--trust-module {name} (Python: trust_modules=[{name!r}])"
    )


def in_file(file: Path, err: Exception) -> str:
    """An error's message as one about `file`: prefixed with its path once."""
    message = str(err)
    if message.startswith(f"{file}: "):
        return message
    return f"{file}: {message.removeprefix('config: ')}"


def _count_items(value: Any, limit: int) -> int:
    """Values in a JSON tree (stops counting past `limit`)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count
