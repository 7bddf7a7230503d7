"""Fine-tuning strategies: frozen norm layers, a frozen backbone, and training in stages.

A stage (`optim.stages`) is a span of epochs with its own learning-rate schedule and its own
choice of what is frozen and how samples are drawn. Everything here is a function of the
epoch number, so a run resumed mid-stage recomputes the same state from its checkpoint.
Freezing keeps parameters in the optimizer (a later stage may unfreeze them) but out of the
autograd graph: their gradients stay None and the optimizer skips them (no step, no weight
decay, no momentum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lookcloser.config import OptimConfig, StageConfig
from lookcloser.models.backbones import Backbone
from lookcloser.models.weights import is_new_key

# Norm layers with running statistics or affine parameters (timm's BatchNormAct2d,
# LayerNorm2d and GroupNormAct subclass these).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclass(frozen=True)
class Stage:
    """One resolved stage: its epochs [start, start + epochs) and what it trains."""

    start: int
    epochs: int
    lr: float
    warmup_epochs: float
    freeze_norm: bool
    freeze_backbone: bool


def resolve_stages(optim: OptimConfig, epochs: int, freeze_norm: bool) -> list[Stage]:
    """The run's stages with every unset key filled from the run's config (one if none)."""
    configured = optim.stages or [StageConfig(epochs=epochs)]
    stages, start = [], 0
    for stage in configured:
        stages.append(
            Stage(
                start=start,
                epochs=stage.epochs,
                lr=optim.lr if stage.lr is None else stage.lr,
                warmup_epochs=optim.warmup_epochs
                if stage.warmup_epochs is None
                else stage.warmup_epochs,
                freeze_norm=freeze_norm if stage.freeze_norm is None else stage.freeze_norm,
                freeze_backbone=stage.freeze_backbone,
            )
        )
        start += stage.epochs
    return stages


def stage_at(stages: list[Stage], epoch: int) -> int:
    """Index of the stage that epoch `epoch` (0-based) belongs to (the last one past the end)."""
    for i, stage in enumerate(stages):
        if epoch < stage.start + stage.epochs:
            return i
    return len(stages) - 1


def _new_module_ids(method: nn.Module) -> set[int]:
    """Ids of every module inside the method's new (from scratch) modules."""
    new_modules = method.new_modules() if hasattr(method, "new_modules") else []
    return {id(m) for module in new_modules for m in module.modules()}


def pretrained_norms(method: nn.Module) -> list[nn.Module]:
    """Norm layers of the method's pretrained networks: inside a Backbone's timm model, not
    under its new prefixes (plug-ins) and not inside one of the method's new modules."""
    new = _new_module_ids(method)
    found: dict[int, nn.Module] = {}
    for backbone in (m for m in method.modules() if isinstance(m, Backbone)):
        for name, module in backbone.model.named_modules():
            if (
                isinstance(module, NORM_TYPES)
                and id(module) not in new
                and not is_new_key(f"{name}.weight", backbone.new_prefixes)
            ):
                found[id(module)] = module
    return list(found.values())


def backbone_modules(method: nn.Module) -> list[Backbone]:
    """The method's networks (Backbone modules), outermost only."""
    backbones = [m for m in method.modules() if isinstance(m, Backbone)]
    inner = {id(m) for b in backbones for m in b.modules() if m is not b}
    return [b for b in backbones if id(b) not in inner]


class Freezer:
    """Applies a stage's freezing to a method and keeps it through mode switches.

    Frozen norm layers stay in eval mode (running statistics unchanged) with their affine
    parameters out of the graph; a frozen backbone has every parameter out of the graph and
    every norm layer in eval mode. Parameters a method froze itself are left alone.
    """

    def __init__(self, method: nn.Module):
        self.method = method
        self.frozen_params: list[nn.Parameter] = []
        self.frozen_norms: list[nn.Module] = []

    def apply(self, freeze_norm: bool, freeze_backbone: bool) -> None:
        """Freeze what the stage says (and unfreeze what an earlier stage froze and this one
        does not)."""
        norms: dict[int, nn.Module] = {}
        params: dict[int, nn.Parameter] = {}
        if freeze_norm:
            for module in pretrained_norms(self.method):
                norms[id(module)] = module
        if freeze_backbone:
            for backbone in backbone_modules(self.method):
                norms.update({id(m): m for m in backbone.modules() if isinstance(m, NORM_TYPES)})
                params.update({id(p): p for p in backbone.parameters()})
        for module in norms.values():
            params.update({id(p): p for p in module.parameters()})
        ours = {id(p) for p in self.frozen_params}
        for param in self.frozen_params:
            if id(param) not in params:
                param.requires_grad_(True)
        for module in self.frozen_norms:
            if id(module) not in norms:
                module.train(self.method.training)
        # A parameter the method itself keeps out of training is not ours to release later.
        self.frozen_params = [p for p in params.values() if id(p) in ours or p.requires_grad]
        self.frozen_norms = list(norms.values())
        for param in self.frozen_params:
            param.requires_grad_(False)
        self.keep_modes()

    def keep_modes(self) -> None:
        """Put the frozen norm layers back in eval mode (after a `train()` call)."""
        for module in self.frozen_norms:
            module.eval()

    def drop_gradients(self) -> None:
        """No update for frozen parameters, even if a method turned their gradients back on."""
        for param in self.frozen_params:
            param.grad = None


class StagedScheduler:
    """timm schedulers, one per stage, each over its own epochs from its own learning rate.

    Lightning keeps it like a scheduler (`optimizer`, `state_dict`, `load_state_dict`);
    `FGVCSystem` calls `step_update` after every optimizer step and at each stage's start.
    """

    def __init__(self, optimizer, stages: list[Stage], make):
        """`make(optimizer, stage)` builds a timm scheduler; timm reads its base learning rate
        from the groups' `initial_lr`, which is set to the stage's rate first."""
        self.optimizer = optimizer
        self.stages = stages
        self.schedulers = []
        for stage in stages:
            for group in optimizer.param_groups:
                group["initial_lr"] = stage.lr
            self.schedulers.append(make(optimizer, stage))
        if len(stages) > 1:  # the first stage's rates are the ones in force at the start
            self.schedulers[0].step_update(num_updates=0)

    def step_update(self, num_updates: int, epoch: int = 0, steps_per_epoch: int = 0) -> None:
        """Set every group's learning rate for the run's optimizer step `num_updates`, taken
        in epoch `epoch` (each epoch has `steps_per_epoch` optimizer steps)."""
        index = stage_at(self.stages, epoch)
        start = self.stages[index].start * steps_per_epoch
        self.schedulers[index].step_update(num_updates=num_updates - start)

    def state_dict(self) -> dict[str, Any]:
        """The stages' scheduler states (all are functions of the step; kept for Lightning)."""
        return {"stages": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stages' scheduler states."""
        for scheduler, saved in zip(self.schedulers, state["stages"], strict=True):
            scheduler.load_state_dict(saved)
