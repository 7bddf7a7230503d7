"""The whole config checked before any data or model is touched: the typed tree's own ranges
(config.py), then each feature's cross-checks, called from here so that every workflow (train,
compare, the semi-supervised rounds, a model directory's load) checks the same way."""

from __future__ import annotations

from pathlib import Path

from lookcloser.config import Config, method_options
from lookcloser.errors import ConfigError
from lookcloser.methods.options import options_type
from lookcloser.semi import check_semi
from lookcloser.tta import TTA

# Only light modules at the top: `check_settings` runs before torch is imported.


def check_settings(cfg: Config) -> Config:
    """The checks that need no model code, in well under a second: every key, type and range
    (config.py), the semi-supervised settings, the TTA spec and a built-in method's options
    (a plug-in method's module is imported for its options: it is the user's own code)."""
    cfg.validate()
    check_semi(cfg)
    try:
        TTA.parse(cfg.model.tta)
    except ConfigError as e:
        raise ConfigError(f"model.tta={cfg.model.tta!r}: {e}") from None
    name, module = cfg.method.get("name", "baseline"), cfg.method.get("module")
    options = options_type(name, module)
    if options is None:
        from lookcloser.methods.base import method_class

        options = method_class(name, module).Options
    method_options(cfg, options)
    return cfg


def check_config(cfg: Config, resolve_paths: bool = True) -> Config:
    """Every range, the method's options and the declared metadata, checked before any data
    or model is touched (`check_settings`, then the cross-checks that need the method's
    class); with `resolve_paths`, local data paths made absolute (`resolve_local_paths`)."""
    from lookcloser.data.boxes import check_box_config
    from lookcloser.data.meta import check_meta_keys
    from lookcloser.methods.base import check_crop_use, check_meta_use, method_class
    from lookcloser.models.heads import HeadSpec

    check_settings(cfg)
    tta = TTA.parse(cfg.model.tta)
    if tta is not None and cfg.model.crop_fusion != "none" and cfg.data.test_boxes != "attention":
        # Found now, not in the report after training: the crops' views are not made.
        raise ConfigError(
            f"model.tta={cfg.model.tta!r} with data.test_boxes={cfg.data.test_boxes!r}: "
            "test-time augmentation takes crops from the model's attention only "
            "(data.test_boxes=attention) or no TTA (model.tta=none)"
        )
    cls = method_class(cfg.method.get("name", "baseline"), cfg.method.get("module"))
    keys = check_meta_keys(cfg.data.meta_keys)
    check_meta_use(cls.name, cls.accepts_meta, HeadSpec.from_config(cfg.model), keys)
    check_crop_use(cls.name, cls.supports_crop_fusion, HeadSpec.from_config(cfg.model))
    check_box_config(cfg)
    if resolve_paths:
        resolve_local_paths(cfg)
    return cfg


def resolve_local_paths(cfg: Config) -> Config:
    """Local paths of data.* as absolute, resolved paths (URLs and `source:` prefixes kept),
    so config.yaml and model.json name the same data from any working folder."""
    from lookcloser.data.boxes import box_source_kind
    from lookcloser.data.sources import source_names

    def local(key: str, path: str) -> str:
        if "://" in path or path.startswith("pipe:"):
            return path
        try:
            return str(Path(path).expanduser().resolve())
        except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a link loop
            raise ConfigError(f"data.{key}: {path!r} is not a usable path ({err})") from None

    data = cfg.data
    if data.root:
        data.root = local("root", data.root)
    if data.unlabelled:
        name, sep, root = data.unlabelled.partition(":")
        if sep and name in source_names():
            data.unlabelled = f"{name}:{local('unlabelled', root)}"
        else:
            data.unlabelled = local("unlabelled", data.unlabelled)
    for key in ("boxes", "test_boxes"):
        if box_source_kind(getattr(data, key), f"data.{key}") == "file":
            setattr(data, key, local(key, getattr(data, key)))
    return cfg
