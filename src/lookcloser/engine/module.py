"""One LightningModule that trains any Method: it never knows which method it runs."""

from __future__ import annotations

import math

import lightning as L
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lookcloser.config import OptimConfig
from lookcloser.data.batch import Batch
from lookcloser.data.loading import sample_seed
from lookcloser.engine.finetune import Freezer, StagedScheduler, resolve_stages, stage_at
from lookcloser.errors import ConfigError
from lookcloser.methods.base import Method
from lookcloser.models.backbones import Backbone


class FGVCSystem(L.LightningModule):
    """Drives a Method: its losses in training, its logits in validation."""

    def __init__(
        self,
        method: Method,
        optim: OptimConfig,
        epochs: int,
        seed: int = 0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        ema_decay: float | None = None,
        freeze_norm: bool = False,
        semi: nn.Module | None = None,
    ):
        super().__init__()
        if getattr(method, "inference_only", False):
            raise ConfigError(
                f"method {method.name!r}: this is its inference form (training-only parts "
                "dropped); train the method as built by build_method"
            )
        self.method = method
        self.optim_cfg = optim
        self.epochs = epochs
        self.seed = seed
        self.mixup = (
            Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                num_classes=method.num_classes,
                label_smoothing=0.0,
            )
            if mixup > 0 or cutmix > 0
            else None
        )
        self.ema = None
        if ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(method, decay=ema_decay)
        self.val_top1 = MulticlassAccuracy(num_classes=method.num_classes, average="micro")
        self.batches_done = 0  # this epoch's training batches, those before a resume included
        self._resumed_position: tuple[int, int] | None = None
        # optim.stages (one stage of `epochs` if none): what each span of epochs freezes.
        self.stages = resolve_stages(optim, epochs, freeze_norm)
        self.freezer = Freezer(method)
        self._stage_epoch: int | None = None  # the epoch whose stage was last entered
        # An unlabelled objective (semi.strategy=pseudo_label|fixmatch, lookcloser.semi.online)
        # added to any method's loss; its bookkeeping travels in the checkpoints.
        self.semi = semi

    @property
    def teacher(self) -> Method:
        """The model validation measures: the EMA model if kept, else the trained one."""
        return self.ema.module if self.ema is not None else self.method

    # ---- training ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Per-step seeding: dropout and a method's random views depend on the step alone,
        # so a resumed run repeats exactly what an uninterrupted one does.
        torch.manual_seed(sample_seed(self.seed + self.global_rank, self.global_step, -2))
        self._enter_stage()

    def training_step(self, batch: Batch, batch_idx: int):
        if self.mixup is not None and len(batch) % 2 == 0:
            # Images and targets are mixed; metadata stays the first image's.
            images, targets = self.mixup(batch.images, batch.targets)
            batch = batch.replace(images=images, targets=targets)
        losses = self.method.training_losses(batch)
        if self.semi is not None:
            extra = self.semi.losses(self.method, self.teacher, batch)
            losses = {
                **losses,
                "loss": losses["loss"] + extra["unlabelled"],
                "semi_loss": extra["unlabelled"],
                "semi_kept": extra["kept"],
            }
        for name, value in losses.items():
            # Step values every log_every_n_steps, and epoch means (so short runs log too).
            self.log(
                f"train/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_step=True,
                on_epoch=True,
                batch_size=len(batch),
            )
        # Counted here, not taken from batch_idx: after a second mid-epoch restart Lightning's
        # batch_idx starts again at 0 while the sampler skipped what earlier runs trained on.
        self.batches_done += 1
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        self.freezer.drop_gradients()

    def train(self, mode: bool = True) -> FGVCSystem:
        super().train(mode)
        if mode and hasattr(self, "freezer"):
            self.freezer.keep_modes()  # frozen norm layers keep their statistics
        return self

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.method, step=self.global_step)

    def on_train_epoch_end(self) -> None:
        if self.semi is not None:
            self.semi.end_epoch(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        # A mid-epoch resume continues its epoch's count (if Lightning calls this hook then).
        resumed, self._resumed_position = self._resumed_position, None
        same = resumed is not None and resumed[0] == self.current_epoch
        self.batches_done = resumed[1] if same else 0
        self._enter_stage()
        # Lightning calls set_epoch on samplers only; streamed (iterable) data needs it too.
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def _enter_stage(self) -> None:
        """Freeze what this epoch's stage freezes, once per epoch. The stage follows from the
        epoch alone, so a run resumed mid-epoch (when Lightning skips on_train_epoch_start)
        is put in the same state by its first batch."""
        if self._stage_epoch == self.current_epoch:
            return
        self._stage_epoch = self.current_epoch
        stage = self.stages[stage_at(self.stages, self.current_epoch)]
        self.freezer.apply(stage.freeze_norm, stage.freeze_backbone)
        if len(self.stages) > 1:  # the stage's own schedule from its first step
            self._step_schedule()

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # The val split only (the datamodule never holds the test split).
        model = self.teacher
        if batch.crops is None:
            logits = model(batch.images, batch.meta, batch.meta_mask)
        else:  # crop fusion with boxes of the data
            logits = model(batch.images, batch.meta, batch.meta_mask, crops=batch.crops)
        self.val_top1.update(logits, batch.targets)
        self.log("val/top1", self.val_top1, prog_bar=True, on_epoch=True, batch_size=len(batch))
        if self.semi is not None:
            self.semi.observe_validation(model, batch.images, logits)

    def on_validation_epoch_start(self) -> None:
        if self.semi is not None:
            self.semi.start_validation()

    def on_validation_epoch_end(self) -> None:
        if self.semi is not None:
            self.semi.end_validation()

    # ---- checkpoints: where in the epoch we are, for resuming mid-epoch ---------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lookcloser_position"] = {
            "epoch": self.current_epoch,
            "batches_done": self.batches_done,
            # Saved after the epoch's last batch (at its end, or on that batch): Lightning
            # resumes such a checkpoint at the next epoch's start, so nothing is to be skipped.
            "epoch_finished": self.batches_done >= self.trainer.num_training_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        position = checkpoint.get("lookcloser_position")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if not position or not position["batches_done"] or position.get("epoch_finished"):
            return
        self.batches_done = position["batches_done"]
        self._resumed_position = (position["epoch"], position["batches_done"])
        if hasattr(datamodule, "resume_at"):
            datamodule.resume_at(position["epoch"], position["batches_done"])

    # ---- optimizer and schedule -------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = create_optimizer_v2(
            parameter_groups(self.method, cfg),
            opt=cfg.name,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
        )
        if cfg.scheduler == "none" and len(self.stages) == 1:
            # Without a timm scheduler nothing applies the groups' lr_scale, so apply it once here.
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)
            return optimizer
        # Lightning knows the optimizer steps per epoch (devices, drop_last, accumulation).
        updates_per_epoch = max(1, self.trainer.estimated_stepping_batches // self.epochs)

        def make(optimizer, stage):
            constant = cfg.scheduler == "none"  # stages without a schedule: their own lr each
            scheduler, _ = create_scheduler_v2(
                optimizer,
                sched="cosine" if cfg.scheduler == "cosine" else "step",
                num_epochs=stage.epochs,
                decay_epochs=cfg.step_epochs,
                decay_rate=1.0 if constant else cfg.step_gamma,
                min_lr=cfg.min_lr,
                warmup_epochs=stage.warmup_epochs,
                warmup_lr=stage.lr * 0.01,
                step_on_epochs=False,
                updates_per_epoch=updates_per_epoch,
            )
            return scheduler

        scheduler = StagedScheduler(optimizer, self.stages, make)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers step on update counts (and honour per-group lr_scale).
        self._step_schedule(scheduler)

    def _step_schedule(self, scheduler: StagedScheduler | None = None) -> None:
        scheduler = scheduler or self.lr_schedulers()
        if len(self.stages) == 1:
            scheduler.step_update(self.global_step)
            return
        trainer = self.trainer
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        scheduler.step_update(self.global_step, self.current_epoch, steps_per_epoch)


def parameter_groups(method: Method, cfg: OptimConfig) -> list[dict]:
    """Pretrained groups (weight decay, optional layer decay) plus new modules at head_lr_scale
    and modules with their own rate (`lr_scales()` of the method and of each backbone: a
    spatial transformer at its stn_lr_scale).

    New are `method.new_modules()` and every backbone's declared `new_prefixes`, wherever
    they sit; each backbone's pretrained rest gets timm's groups, as if the new modules
    were not there (so layer decay keeps its depths).
    """
    backbones = [m for m in method.modules() if isinstance(m, Backbone)]
    new_ids = {id(p) for m in method.new_modules() for p in m.parameters()}
    new_ids |= {id(p) for b in backbones for p in b.new_parameters()}
    scaled = [*method.lr_scales(), *(pair for b in backbones for pair in b.lr_scales())]
    own = {id(p): (p, scale) for m, scale in scaled for p in m.parameters()}
    groups = []
    for backbone in backbones:
        pretrained = _Pretrained(backbone.model, new_ids | own.keys())
        if cfg.layer_decay is not None:
            groups += param_groups_layer_decay(
                pretrained, cfg.weight_decay, layer_decay=cfg.layer_decay
            )
        else:
            groups += param_groups_weight_decay(pretrained, cfg.weight_decay)
    seen = {id(p) for g in groups for p in g["params"]} | own.keys()
    rest = [p for p in method.parameters() if id(p) not in seen and p.requires_grad]
    new = [p for p in rest if id(p) in new_ids]
    other = [p for p in rest if id(p) not in new_ids]
    own_groups: dict[float, list] = {}
    for p, scale in own.values():
        if p.requires_grad:
            own_groups.setdefault(scale, []).append(p)
    for scale, params in ((cfg.head_lr_scale, new), (1.0, other), *own_groups.items()):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": scale})
    return [g for g in groups if g["params"]]


class _Pretrained:
    """A timm model as timm's param-group helpers see it: without the parameters in `skip`."""

    def __init__(self, model: nn.Module, skip: set[int]):
        self._model = model
        self._skip = skip

    def __getattr__(self, name: str):
        return getattr(self._model, name)  # group_matcher, pretrained_cfg, ...

    def named_parameters(self, *args, **kwargs):
        """The model's named parameters except the skipped ones."""
        for name, param in self._model.named_parameters(*args, **kwargs):
            if id(param) not in self._skip:
                yield name, param


def count_parameters(module: nn.Module) -> int:
    """Number of parameters in a module."""
    return sum(p.numel() for p in module.parameters())
