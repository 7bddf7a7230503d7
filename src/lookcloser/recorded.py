"""A model directory's recorded config and method, loaded as untrusted input: the config
checked as `lookcloser train` checks one (no module imported unless trusted, no file or network
read by timm), and the method built only once a bare copy on the meta device has the shapes of
the weights file."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lookcloser.checks import check_config
from lookcloser.config import Config
from lookcloser.data.meta import check_meta_keys
from lookcloser.errors import LookcloserError, ModelDirError
from lookcloser.methods import build_method
from lookcloser.modeldir import MODEL_JSON, check_module_trusted, in_file, shorten

# timm.create_model arguments that read a file or the network: a model directory's weights
# come from its model.safetensors only.
FILE_KWARGS = (
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_model_args",
    "cache_dir",
)
# The largest number a model directory may pass to timm in model.kwargs (sizes, depths).
MAX_KWARG_NUMBER = 16384


def check_model_config(path: str | Path, record: dict[str, Any], trust_modules=()) -> Any:
    """The Config of a checked model.json record, validated as `lookcloser train` validates a
    config file (messages start with the model.json path). The method's `module` is imported
    only if the user trusts it (`trust_modules`, `trusting_modules`); training's weight sources
    (model.pretrained, model.weights) are switched off."""
    meta_path = Path(path) / MODEL_JSON
    raw = record["config"]
    method = raw.get("method")
    module = method.get("module") if isinstance(method, dict) else None
    if module is not None and module != "":
        check_module_trusted(meta_path, module, trust_modules)
    try:
        cfg = Config.from_dict(raw, where=str(meta_path))
    except LookcloserError as err:
        raise ModelDirError(in_file(meta_path, err)) from None
    for key, value in cfg.model.kwargs.items():
        if key in FILE_KWARGS:
            raise ModelDirError(
                f"{meta_path}: config.model.kwargs.{key}: makes timm read a file or the network; "
                "refused when loading a model directory (its weights are its model.safetensors)"
            )
        # timm expands some numbers before building anything (depth_multiplier=1e9 is a list
        # of a billion blocks): a model directory's are bounded.
        if _largest_number(value) > MAX_KWARG_NUMBER:
            raise ModelDirError(
                f"{meta_path}: config.model.kwargs.{key}: numbers up to {MAX_KWARG_NUMBER} are "
                f"accepted from a model directory, got {shorten(value)}"
            )
    cfg.model.pretrained = False
    cfg.model.weights = None
    try:
        check_config(cfg, resolve_paths=False)  # a model's data paths are not looked at here
    except LookcloserError as err:
        raise ModelDirError(in_file(meta_path, err)) from None
    return cfg


def build_recorded_method(meta_path: Path, cfg: Any, num_classes: int, header: dict) -> Any:
    """The method model.json records, for inference, built only once a bare copy (on the meta
    device: no memory) has the shapes of the weights file's tensors (`header`): a tampered
    number can neither build a huge model nor run long."""
    try:
        check_meta_keys(cfg.data.meta_keys)
        # A model has about as many modules, parameters and buffers as saved tensors; a
        # tampered depth or width stops early instead of building for minutes.
        with _registration_limit(5 * len(header) + 5000), torch.device("meta"):
            bare = build_method(cfg, num_classes, pretrained=False).for_inference()
        shapes = {k: tuple(v.shape) for k, v in bare.state_dict().items()}
        del bare
        expected = {name: shape for name, (_, shape) in header.items()}
        if shapes != expected:
            raise ModelDirError(
                f"{meta_path}: the weights do not fit the recorded model (method "
                f"{cfg.method.get('name')!r}, backbone {cfg.model.backbone!r}, {num_classes} "
                f"classes): {_shape_difference(shapes, expected)}"
            )
        return build_method(cfg, num_classes, pretrained=False).for_inference()
    except ModelDirError:
        raise
    except LookcloserError as err:
        raise ModelDirError(in_file(meta_path, err)) from None
    except Exception as err:  # a value that passed every check but the model's own
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ModelDirError(
            f"{meta_path}: the recorded model cannot be built ({type(err).__name__}: {text})"
        ) from None


def _shape_difference(model: dict, weights: dict) -> str:
    for key in model:
        if key not in weights:
            return f"{key} {model[key]} is not in the weights file"
    for key in weights:
        if key not in model:
            return f"the weights file's {key} {weights[key]} is not in the model"
    key = next(k for k in model if model[k] != weights[k])
    return f"{key} is {weights[key]} in the weights file, {model[key]} in the model"


class _TooManyParts(Exception):
    pass


@contextmanager
def _registration_limit(limit: int) -> Iterator[None]:
    """Raise once more than `limit` modules, parameters and buffers are registered."""
    from torch.nn.modules import module as torch_module

    count = 0

    def hook(*args):
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyParts(f"more than {limit} modules and tensors for the saved weights")

    handles = [
        torch_module.register_module_module_registration_hook(hook),
        torch_module.register_module_parameter_registration_hook(hook),
        torch_module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _largest_number(value: Any) -> float:
    """The largest absolute number in a JSON tree (0 without numbers; NaN counts as infinite)."""
    largest, stack = 0.0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            # (int stays int: float() of a 400-digit integer overflows)
            largest = max(largest, abs(item) if item == item else math.inf)
    return largest
