"""The typed config tree: YAML in and out, dotted `key=value` overrides, clear errors.

Every run saves its resolved config, so a run can be repeated from its directory alone.
Method options live under `method.*`; their types come from the chosen method's `Options`
dataclass, so they are checked like every other key once the method is known. Open mappings
(`method.*`, `model.kwargs.*`) take one level of dotted keys; their values may be any YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lookcloser.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The valid numeric range of a config key (checked when set and before a run)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN (JSON files may hold it) is in no range
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def describe(self) -> str:
        """The range as text, e.g. '>= 1' or 'in (0, 1]'."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def ranged(default: Any, low=None, high=None, *, low_open=False, high_open=False) -> Any:
    """A dataclass field whose numeric value (or each number of a tuple) must lie in a range."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


# The largest image side any input size may ask for (data.image_size, a model directory's
# preprocessing, test-time scales): 4096^2 x 3 floats is already 200 MB per image.
MAX_IMAGE_SIZE = 4096

POSITIVE = {"low": 0, "low_open": True}
FRACTION = {"low": 0, "high": 1}  # a probability or share, 0 and 1 included


@dataclass
class SyntheticConfig:
    """Parameters of the built-in synthetic fine-grained set (`data.source=synthetic`)."""

    classes: int = ranged(8, 2)
    per_class: int = ranged(60, 1)
    test_per_class: int = ranged(20, 0)
    size: int = ranged(128, 32)
    seed: int = ranged(0, 0)
    # Per-sample latitude, longitude and date tied to the class (a home region and season per
    # class, with noise; some values missing), for measuring metadata fusion.
    meta: bool = False


@dataclass
class DataConfig:
    """Where images come from and how they are turned into tensors."""

    source: str = "synthetic"
    root: str | None = None
    image_size: int = ranged(224, 16, MAX_IMAGE_SIZE)
    batch_size: int = ranged(32, 1)
    num_workers: int = ranged(2, 0)
    on_bad_image: Literal["error", "skip"] = "error"
    verify_images: bool = True
    max_image_pixels: int = ranged(89_478_485, 1)
    # Single-folder ImageFolder / CSV without a split column: seeded stratified split.
    test_fraction: float = ranged(0.2, 0, 1, low_open=True, high_open=True)
    # Validation during training: the source's own val split where it has one, else this share
    # of each class carved from train (0 = no validation). The test split is for the report only.
    val_fraction: float = ranged(0.1, 0, 1, high_open=True)
    split_seed: int = 0
    # Per-sample metadata the model takes as input (numbers, e.g. latitude); none by default.
    # Missing values are masked per sample; identifiers (ids, labels, paths) are refused.
    meta_keys: list[str] = field(default_factory=list)
    # Unlabelled images handed to the method next to each batch: a folder (sub-folders are not
    # classes) or `source:root` (that source's training images, labels ignored).
    unlabelled: str | None = None
    unlabelled_batch_size: int | None = ranged(None, 1)
    # Label granularity for datasets that have several (FGVC-Aircraft: variant|family|manufacturer;
    # iNaturalist: species|genus|...|kingdom|supercategory).
    level: str | None = None
    # Which official training split (aircraft, flowers102: trainval|train; inat 2021: train|train_mini).
    train_split: str | None = None
    # Streaming shards (data.source=shards): samples held for shuffling.
    shuffle_buffer: int = ranged(1000, 1)
    # Train-time augmentation (timm create_transform); eval is resize + centre crop.
    # At least 1/4: evaluation resizes to image_size / crop_pct before cropping.
    crop_pct: float = ranged(0.875, 0.25, 1)
    train_scale: tuple[float, float] = ranged((0.5, 1.0), **POSITIVE, high=1)
    hflip: float = ranged(0.5, **FRACTION)
    # Random rotation up to this many degrees either way (0 = off), before the crop.
    rotation: float = ranged(0.0, 0, 180)
    color_jitter: float = ranged(0.2, 0)
    auto_augment: str | None = None
    random_erasing: float = ranged(0.0, **FRACTION)
    # What an erased box holds: zeros (timm's const mode), noise (timm's pixel mode), or the
    # image's own per-channel mean (the iNat 2021 recipe).
    erasing_fill: Literal["zero", "noise", "mean"] = "zero"
    # An augmentation preset (AUGMENTATION_PRESETS): sets the keys it names unless they are
    # set explicitly (before or after it).
    preset: Literal["none", "inat21"] = "none"
    # Training sampler: uniform shuffling, or drawing with class-balanced / sqrt-frequency weights.
    sampler: Literal["uniform", "balanced", "sqrt"] = "uniform"
    mixup: float = ranged(0.0, 0)
    cutmix: float = ranged(0.0, 0)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Object boxes for model.crop_fusion (data/boxes.py): the crop of each training image comes
    # from the model's own attention, the source's annotated boxes (`bbox`) or a JSON box file
    # (path -> [x, y, w, h]); test_boxes: the same for validation and the test report.
    boxes: str = "attention"
    test_boxes: str = "attention"


@dataclass
class ModelConfig:
    """The backbone and where its weights come from."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    # A local checkpoint (safetensors or a PyTorch state dict) to start from.
    weights: str | None = None
    # How checkpoint keys map onto the model: none | position | strip:<prefix> | a registered name.
    weights_key_map: str = "none"
    drop_rate: float = ranged(0.0, 0, 1, high_open=True)
    drop_path_rate: float = ranged(0.0, 0, 1, high_open=True)
    # Extra arguments for timm.create_model, e.g. model.kwargs.img_size=448,
    # model.kwargs.dynamic_img_size=true, model.kwargs.output_stride=16.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The class head (models.heads registry): linear, cosine, arcface, subcenter_arcface.
    head: str = "linear"
    # Options of cosine / margin heads; None = the head's default (a head that does not take
    # an option refuses it). The margin is in radians.
    head_scale: float | None = ranged(None, **POSITIVE)
    head_margin: float | None = ranged(None, 0, 1.5)
    head_subcenters: int | None = ranged(None, 1, 64)
    # Metadata fusion in front of every class head (models.fusion): data.meta_keys encoded
    # (location on the sphere, day of year on a circle), an MLP, joined with the image feature.
    fusion: Literal["none", "add", "concat", "gate"] = "none"
    meta_hidden: int = ranged(256, 1, 65536)
    # Training: the share of samples whose metadata is masked whole (trains the image-only path).
    meta_dropout: float = ranged(0.1, 0, 1, high_open=True)
    # Object-crop fusion (models/crops.py): the image and a crop of its object (data.boxes)
    # through the same backbone, pooled features joined (concat or add) before the class head.
    crop_fusion: Literal["none", "concat", "add"] = "none"
    # Attention boxes: the largest connected region of cells above crop_alpha x mean importance.
    crop_alpha: float = ranged(1.0, 0, 100)
    # Attention plug-ins (models/plugins.py): SE, SK or CBAM blocks after the CNN's stages
    # (feature levels; empty = every level from stride 4 on), starting as the identity.
    attention: Literal["none", "se", "sk", "cbam"] = "none"
    attention_stages: list[int] = field(default_factory=list)
    attention_reduction: int = ranged(16, 1, 1024)
    # The blocks' gate gamma at step 0: 0 = the identity (the pretrained network unchanged),
    # 1 = the block as published from the first step.
    attention_gate_init: float = ranged(0.0, 0, 1)
    # A spatial transformer in front of the backbone, starting as the identity.
    stn: bool = False
    stn_mode: Literal["affine", "similarity", "translation_scale"] = "affine"
    # The STN's learning rate as a multiple of optim.lr (not of the head's): a warp that
    # leaves the image gets no gradient back, so it must move slowly.
    stn_lr_scale: float = ranged(0.1, **POSITIVE)
    # The STN's localisation net: a small CNN from scratch, or a copy of model.backbone with
    # its pretrained weights (as the STN paper's fine-grained models); it reads the image at
    # stn_size x stn_size.
    stn_localisation: Literal["scratch", "backbone"] = "scratch"
    stn_size: int = ranged(64, 16, 1024)
    # The side of the STN's output, the view the backbone classifies (0 = the input's size).
    # Below data.image_size it gives the STN paper's zoom headroom: a zoom shows real pixels.
    stn_view_size: int = ranged(0, 0, 4096)
    # Pretrained BatchNorm / LayerNorm / GroupNorm layers frozen: running statistics and affine
    # parameters stay as loaded (norms inside new modules still train).
    freeze_norm: bool = False
    # Test-time augmentation the trained model defaults to (a `--tta` spec, e.g. flip): stored
    # in model.json like `lookcloser tta-default`, and used by the run's own val / test report.
    tta: str = "none"


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (timm optimizers and schedulers)."""

    name: str = "adamw"
    lr: float = ranged(1e-3, **POSITIVE)
    weight_decay: float = ranged(0.01, 0)
    momentum: float = ranged(0.9, 0, 1, high_open=True)
    # New heads learn this many times faster than the pretrained backbone.
    head_lr_scale: float = ranged(1.0, **POSITIVE)
    layer_decay: float | None = ranged(None, **POSITIVE, high=1)
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: float = ranged(0.0, 0)
    min_lr: float = ranged(0.0, 0)
    step_epochs: int = ranged(30, 1)
    step_gamma: float = ranged(0.1, **POSITIVE, high=1)
    # Training in stages (e.g. the two-stage fine-tune), each with its own epochs and schedule;
    # empty = one stage of trainer.epochs with the keys above.
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of `optim.stages`: its length, learning rate and what is frozen or sampled.

    Unset (null) keys take the run's value (optim.lr, optim.warmup_epochs, model.freeze_norm,
    data.sampler). Each stage runs its own optim.scheduler schedule over its epochs.
    """

    epochs: int = ranged(1, 1)
    lr: float | None = ranged(None, **POSITIVE)
    warmup_epochs: float | None = ranged(None, 0)
    freeze_norm: bool | None = None
    # Only the method's new modules (its heads) train; the pretrained backbone is frozen,
    # weights and norm statistics alike.
    freeze_backbone: bool = False
    sampler: Literal["uniform", "balanced", "sqrt"] | None = None

    HELP: ClassVar[dict[str, str]] = {
        "epochs": "epochs of this stage",
        "lr": "base learning rate of this stage (null: optim.lr)",
        "warmup_epochs": "warm-up epochs at the stage's start (null: optim.warmup_epochs)",
        "freeze_norm": "freeze pretrained norm layers (null: model.freeze_norm)",
        "freeze_backbone": "train only the method's new modules (its heads)",
        "sampler": "training sampler of this stage (null: data.sampler)",
    }


# Augmentation presets (data.preset): values for data keys, applied to every key not set
# explicitly. The iNat 2021 winners name flip, rotation, brightness / contrast / saturation
# jitter and random erasing filled with the image mean, without values; these are ours
# (rotation as in the DCL recipes, jitter and erasing probability as timm's ImageNet recipes).
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "inat21": {
        "hflip": 0.5,
        "rotation": 15.0,
        "color_jitter": 0.4,
        "random_erasing": 0.25,
        "erasing_fill": "mean",
    },
}


@dataclass
class TrainerConfig:
    """Lightning Trainer settings: devices, precision, checkpoints, logs."""

    epochs: int = ranged(10, 1)
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = ranged(1, 1)
    precision: str = "32-true"
    deterministic: bool = False
    accumulate_grad_batches: int = ranged(1, 1)
    gradient_clip_val: float | None = ranged(None, **POSITIVE)
    val_every_n_epochs: int = ranged(1, 0)
    log_every_n_steps: int = ranged(10, 1)
    # Mid-epoch checkpoints (for resuming long epochs); end-of-epoch ones are always kept.
    checkpoint_every_n_steps: int | None = ranged(None, 1)
    # `last` resumes from the run directory's last checkpoint; or a checkpoint path.
    resume: str | None = None
    progress: Literal["rich", "tqdm", "none"] = "rich"
    # torch CPU threads while training: `auto` follows the cores other processes leave free
    # (except with deterministic=true, whose results must not depend on the machine's load).
    cpu_threads: int | Literal["auto"] = ranged("auto", 1)
    max_steps: int = ranged(-1, -1)
    ema_decay: float | None = ranged(None, 0, 1, low_open=True, high_open=True)


@dataclass
class SemiConfig:
    """Semi-supervised learning from `data.unlabelled` images, most of them out-of-class."""

    # none | pseudo_label | fixmatch (online, beside every labelled batch) | cluster_pretrain
    # (stages: embed, cluster, pretrain on cluster ids, fine-tune; see lookcloser.semi).
    strategy: Literal["none", "pseudo_label", "fixmatch", "cluster_pretrain"] = "none"
    # Weight of the unlabelled loss against the method's own.
    weight: float = ranged(1.0, 0)
    # Confidence filter: the teacher's largest class probability must reach this.
    threshold: float = ranged(0.95, 0, 1)
    # Out-of-class filter: the score, and its threshold chosen on the labelled val split as
    # the value that keeps this share of val images (all in-class). none = confidence only.
    # Defaults from docs/benchmarks.md (semi): on flowers12 with butterflies10 as the
    # out-of-class images, the prototype score at the val median was the only precise filter.
    ood_score: Literal["none", "max_softmax", "energy", "prototype"] = "prototype"
    val_keep: float = ranged(0.5, 0, 1, low_open=True)
    # FixMatch's strong view: a timm auto-augment policy, then random erasing (Cutout).
    # Not `-inc1`: with Pillow 13 its posterize gets 0 bits (an error) whenever the sampled
    # magnitude reaches 10, which m9 with mstd0.5 does about once in 40 draws.
    strong_augment: str = "rand-m9-mstd0.5"
    strong_erasing: float = ranged(0.5, **FRACTION)
    # cluster_pretrain: rounds, k-means clusters (null: chosen by silhouette), which clusters
    # are kept, and the epochs of each pretraining stage (null: trainer.epochs).
    rounds: int = ranged(1, 1, 10)
    clusters: int | None = ranged(None, 2)
    min_cluster_size: int = ranged(5, 1)
    cluster_keep: float = ranged(0.8, 0, 1, low_open=True)
    pretrain_epochs: int | None = ranged(None, 1)


@dataclass
class Config:
    """The whole run: data, model, method, optim, trainer, seed and output directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "baseline"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    seed: int = ranged(0, 0)
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        # Keys set through `set` (files, overrides): an augmentation preset leaves them alone.
        self._explicit: set[str] = set()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> Config:
        """Build a config from a nested dict, checking every key and type."""
        cfg = cls()
        for key, value in _flatten(raw):
            cfg.set(key, value, where=where)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Read a YAML file (optional) and apply `key=value` overrides on top."""
        cfg = cls()
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            cfg = cls.from_dict(raw, where=str(path))
        cfg.apply_overrides(overrides or [])
        return cfg

    def apply_overrides(self, overrides: list[str]) -> Config:
        """Apply `a.b=value` strings; values are parsed as YAML scalars then type-checked."""
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.epochs=5")
            key, text = item.split("=", 1)
            try:
                value = yaml.safe_load(text) if text != "" else None
            except yaml.YAMLError:
                value = text
            self.set(key.strip(), value, where="override")
        return self

    def set(self, key: str, value: Any, *, where: str = "config") -> None:
        """Set one dotted key, with type checking and a suggestion for unknown keys."""
        parts = key.split(".")
        if parts[0] == "method":
            if len(parts) != 2:
                raise ConfigError(
                    f"{where}: {key}: method options are one level deep (method.<option>)"
                )
            if parts[1] == "name" and value != self.method.get("name"):
                # Another method: drop the old one's options, keep where methods come from.
                kept = {"module": self.method["module"]} if "module" in self.method else {}
                self.method = {"name": _check_type(key, value, str, where), **kept}
            else:
                self.method[parts[1]] = value
            return
        node: Any = self
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(node)]
            prefix = ".".join(parts[:i])
            if part not in names:
                candidates = [f"{prefix}.{n}" if prefix else n for n in names]
                raise ConfigError(_unknown(key, candidates, where))
            if i < len(parts) - 1 and typing.get_origin(_hint(node, part)) is dict:
                # An open mapping (model.kwargs): the next part is an entry's name.
                dotted = ".".join(parts[: i + 1])
                if len(parts) != i + 2:
                    raise ConfigError(
                        f"{where}: {key}: {dotted} entries are one level deep "
                        f"({dotted}.<name>=<YAML value>, e.g. {dotted}.block_args={{attn_layer: se}})"
                    )
                getattr(node, part)[parts[-1]] = value
                return
            if i == len(parts) - 1:
                hint = _hint(node, part)
                value = _check_type(key, value, hint, where)
                _check_range(key, value, _field(node, part), where)
                setattr(node, part, value)
                self._explicit.add(key)
                self._derive(key)
                return
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{where}: {key}: {'.'.join(parts[: i + 1])} has no sub-keys")

    def _derive(self, key: str) -> None:
        """Keys that follow another: a preset's data keys, the epochs of a staged run."""
        if key == "data.preset":
            chosen = AUGMENTATION_PRESETS[self.data.preset]
            base = DataConfig()
            for name in {n for preset in AUGMENTATION_PRESETS.values() for n in preset}:
                if f"data.{name}" not in self._explicit:
                    setattr(self.data, name, chosen.get(name, getattr(base, name)))
        elif key == "optim.stages" and "trainer.epochs" not in self._explicit:
            stages = self.optim.stages
            self.trainer.epochs = sum(s.epochs for s in stages) or TrainerConfig().epochs

    def validate(self, where: str = "config") -> Config:
        """Check every value's range and the rules between keys (before anything is built)."""
        for key, node, name in _leaves(self):
            _check_range(key, getattr(node, name), _field(node, name), where)
        low, high = self.data.train_scale
        if low > high:
            raise ConfigError(
                f"{where}: data.train_scale: expected [low, high] with low <= high, got {[low, high]}"
            )
        stages = self.optim.stages
        if stages and self.trainer.epochs != sum(s.epochs for s in stages):
            raise ConfigError(
                f"{where}: trainer.epochs={self.trainer.epochs}: with optim.stages the run lasts "
                f"the stages' epochs ({' + '.join(str(s.epochs) for s in stages)} = "
                f"{sum(s.epochs for s in stages)}); leave trainer.epochs unset or set it to that"
            )
        if self.trainer.max_steps == 0:
            raise ConfigError(f"{where}: trainer.max_steps: expected -1 (no limit) or >= 1, got 0")
        devices = self.trainer.devices
        if isinstance(devices, int) and devices != -1 and devices < 1:
            raise ConfigError(
                f"{where}: trainer.devices: expected 'auto', -1 (all) or >= 1, got {devices}"
            )
        return self

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (lists for tuples), ready for YAML or JSON."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def keys(self) -> list[str]:
        """Every valid dotted key (open mappings as `<key>.*`; method options depend on the method)."""
        plain = [k for k, _ in _flatten(self.to_dict()) if k.split(".")[0] != "method"]
        plain = [k for k in plain if not any(k.startswith(f"{m}.") for m in OPEN_MAPPINGS)]
        return plain + [f"{m}.*" for m in OPEN_MAPPINGS if m != "method"]


def _open_mappings(node: type, prefix: str = "") -> list[str]:
    """Dotted names of the dict-typed fields: mappings whose entries are free-form."""
    found = []
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if typing.get_origin(hints[f.name]) is dict:
            found.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            found += _open_mappings(hints[f.name], f"{prefix}{f.name}.")
    return found


# Dict-typed keys (model.kwargs, method): their entries are set as <key>.<name>=<value>.
OPEN_MAPPINGS = _open_mappings(Config)


def check_field(owner: type, name: str, value: Any, key: str, where: str) -> Any:
    """`value` type- and range-checked (and converted) as the config field `name` of the
    dataclass `owner` is, reported as `key`: for values read from elsewhere (model.json)."""
    spec = next(f for f in dataclasses.fields(owner) if f.name == name)
    value = _check_type(key, value, typing.get_type_hints(owner)[name], where)
    _check_range(key, value, spec, where)
    return value


def as_config(
    config: Config | str | Path | dict | None = None, overrides: list[str] | None = None
) -> Config:
    """A Config from a Config, a YAML path or a dict, with `key=value` overrides applied."""
    if isinstance(config, Config):
        cfg = Config.from_dict(config.to_dict())
        return cfg.apply_overrides(overrides or [])
    if isinstance(config, dict):
        return Config.from_dict(config).apply_overrides(overrides or [])
    return Config.load(config, overrides)


def method_options(cfg: Config, options_type: type) -> Any:
    """Build a method's typed options dataclass from `cfg.method`, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    hints = typing.get_type_hints(options_type)
    values = {}
    for name, value in cfg.method.items():
        if name in ("name", "module"):
            continue
        if name not in fields:
            candidates = ["method.name", "method.module"] + [f"method.{n}" for n in fields]
            raise ConfigError(
                _unknown(f"method.{name}", candidates, f"method {cfg.method['name']!r}")
            )
        values[name] = _check_type(f"method.{name}", value, hints[name], "config")
        _check_range(f"method.{name}", values[name], fields[name], "config")
    return options_type(**values)


# ---- helpers ------------------------------------------------------------------------------
def _hint(node: Any, name: str) -> Any:
    return typing.get_type_hints(type(node))[name]


def _field(node: Any, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(node) if f.name == name)


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, owning dataclass, field name) of every non-group field."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", node, f.name


def _check_range(key: str, value: Any, spec: dataclasses.Field, where: str) -> None:
    valid: Range | None = spec.metadata.get("range")
    if valid is None or value is None:
        return
    for number in value if isinstance(value, tuple | list) else (value,):
        if isinstance(number, int | float) and number not in valid:  # words such as "auto" pass
            raise ConfigError(f"{where}: {key}: expected a value {valid.describe()}, got {value!r}")


def _unknown(key: str, candidates: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(candidates)}"
    return f"{where}: unknown key {key!r}{hint}"


def _flatten(raw: dict[str, Any], prefix: str = ""):
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in OPEN_MAPPINGS:
            # One level: entry values stay whole. `name` first, so that setting a method's
            # name does not drop the options after it.
            if "name" in value and dotted == "method":
                yield "method.name", value["name"]
            for k, v in value.items():
                if not (k == "name" and dotted == "method"):
                    yield f"{dotted}.{k}", v
        elif isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _check_type(key: str, value: Any, hint: Any, where: str) -> Any:
    """Return `value` converted to `hint`, or raise a ConfigError that says what was expected."""
    origin = typing.get_origin(hint)
    fail = ConfigError(f"{where}: {key}: expected {_type_name(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg, where)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise fail
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise fail
        return tuple(_check_type(key, v, a, where) for v, a in zip(value, args, strict=True))
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise fail
        if dataclasses.is_dataclass(arg):  # a list of records (optim.stages)
            return [_record(f"{key}[{i}]", v, arg, where) for i, v in enumerate(value)]
        return [_check_type(key, v, arg, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. trainer.precision=16 -> "16"
        raise fail
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"{where}: {key}: is a group of keys, set its fields as {key}.<name>")
    raise fail


def _record(key: str, value: Any, record_type: type, where: str) -> Any:
    """A dataclass from a mapping of its fields, each type- and range-checked."""
    if isinstance(value, record_type):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: {key}: expected a mapping of {_record_keys(record_type)}, got {value!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(record_type)}
    hints = typing.get_type_hints(record_type)
    values = {}
    for name, item in value.items():
        if name not in fields:
            raise ConfigError(_unknown(f"{key}.{name}", [f"{key}.{n}" for n in fields], where))
        values[name] = _check_type(f"{key}.{name}", item, hints[name], where)
        _check_range(f"{key}.{name}", values[name], fields[name], where)
    return record_type(**values)


def _record_keys(record_type: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(record_type))
