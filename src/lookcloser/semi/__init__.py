"""Semi-supervised learning from unlabelled images that are mostly out-of-class.

`semi.strategy` (config.SemiConfig) with `data.unlabelled=FOLDER`, for any method:

* `pseudo_label`, `fixmatch` (online.py): an unlabelled loss added to the method's own at
  every step, with confidence- and OOD-filtered pseudo-labels whose OOD threshold is chosen on
  the labelled val split (scores.py);
* `cluster_pretrain` (pipeline.py): stages run one after the other in sub-run directories:
  embed the unlabelled images, cluster them (clustering.py), pretrain on cluster ids, fine-tune
  on the labelled set; `semi.rounds` repeats with the fine-tuned model, re-clustering the
  images it selects as close to the labelled classes.

Every strategy records what each stage kept and why under RUN_DIR/semi/ (records.py);
`lookcloser data ood-report RUN_DIR` draws it (report.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lookcloser.config import Config
from lookcloser.errors import ConfigError

ONLINE = ("pseudo_label", "fixmatch")


def check_semi(cfg: Config) -> None:
    """The rules between semi.* and the other keys, checked before any data is read."""
    strategy = cfg.semi.strategy
    if strategy == "none":
        return
    if not cfg.data.unlabelled:
        raise ConfigError(
            f"semi.strategy={strategy} needs unlabelled images: set data.unlabelled=FOLDER "
            "(or source:root)"
        )
    if strategy in ONLINE and cfg.semi.ood_score != "none" and cfg.trainer.val_every_n_epochs == 0:
        raise ConfigError(
            f"semi.ood_score={cfg.semi.ood_score}: the out-of-class threshold is chosen at each "
            "validation, but trainer.val_every_n_epochs=0 turns validation off; set it >= 1 or "
            "semi.ood_score=none"
        )


def check_validation(cfg: Config, val_images: int) -> None:
    """An OOD threshold is chosen on the val split: refuse a run without one."""
    if cfg.semi.strategy == "none" or val_images > 0:
        return
    if cfg.semi.strategy in ONLINE and cfg.semi.ood_score == "none":
        return
    raise ConfigError(
        f"semi.strategy={cfg.semi.strategy}: the out-of-class threshold is chosen on the "
        "labelled val split, and this data has none; set data.val_fraction > 0 (or give the "
        "source a val split)" + (", or semi.ood_score=none" if cfg.semi.strategy in ONLINE else "")
    )


def build_objective(cfg: Config, method):
    """The unlabelled objective the engine adds to the method's loss (None if not online)."""
    if cfg.semi.strategy not in ONLINE:
        return None
    from lookcloser.semi.online import UnlabelledObjective

    return UnlabelledObjective(cfg.semi, method.num_classes, method.backbone.num_features)


def unlabelled_transform(cfg: Config, input_size: int, interpolation: str) -> Callable | None:
    """FixMatch's two views (weak: the training transform; strong: + RandAugment and
    erasing); None (the training transform) for the other strategies."""
    if cfg.semi.strategy != "fixmatch":
        return None
    from dataclasses import replace

    from lookcloser.data.transforms import TwoViews, strong_transform, train_transform

    data = replace(cfg.data, image_size=input_size)
    return TwoViews(
        train_transform(data, interpolation),
        strong_transform(data, cfg.semi.strong_augment, cfg.semi.strong_erasing, interpolation),
    )


def write_online_records(
    run_dir: Path, objective, method, cfg: Config, data, transform, progress: bool, device
) -> None:
    """After online training: the per-epoch bookkeeping, then what the final model keeps."""
    from lookcloser.semi.records import write_stage
    from lookcloser.semi.scoring import filter_stage

    summary = objective.summary()
    kept = sum(e["kept"] for e in summary["epochs"])
    seen = sum(e["seen"] for e in summary["epochs"])
    write_stage(
        run_dir,
        {
            "name": "training",
            "kind": "online",
            "total": seen,
            "kept": kept,
            "reasons": {"kept": kept, "dropped": seen - kept},
            **summary,
        },
        [],
    )
    if not data.val:  # ood_score=none without a val split: nothing to choose thresholds on
        return
    record, rows, _ = filter_stage(
        "final-model",
        method,
        cfg,
        data.train,
        data.val,
        data.unlabelled,
        data.classes,
        transform,
        progress,
        device,
    )
    write_stage(run_dir, record, rows)
