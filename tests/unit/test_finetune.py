"""Fine-tuning strategies: layer-wise lr decay, frozen norms, training in stages, EMA, presets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lookcloser import api
from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.data.loading import EpochSampler
from lookcloser.engine.datamodule import _sampling_weights
from lookcloser.engine.finetune import NORM_TYPES, pretrained_norms
from lookcloser.engine.module import FGVCSystem
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method


def tiny_cfg(backbone: str, *overrides: str) -> Config:
    size = ["model.kwargs.img_size=32"] if "vit" in backbone else []
    return Config.load(
        None, [f"model.backbone={backbone}", "model.pretrained=false", *size, *overrides]
    )


def system_at_step(cfg: Config, steps: int, epochs: int = 1, steps_per_epoch: int = 10):
    """A system whose optimizer and scheduler are built as Lightning would, then stepped."""
    method = build_method(cfg, 3)
    system = FGVCSystem(method, cfg.optim, epochs=epochs, freeze_norm=cfg.model.freeze_norm)
    trainer = SimpleNamespace(
        estimated_stepping_batches=epochs * steps_per_epoch,
        global_step=steps,
        num_training_batches=steps_per_epoch,
        accumulate_grad_batches=1,
        current_epoch=steps // steps_per_epoch,
    )
    system._trainer = trainer
    config = system.configure_optimizers()
    if not isinstance(config, dict):  # optim.scheduler=none: an optimizer alone
        return system, config, None
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    system.lr_schedulers = lambda: scheduler
    system.lr_scheduler_step(scheduler, None)
    return system, optimizer, scheduler


def lr_of(optimizer, param: nn.Parameter) -> float:
    return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))


# ---- layer-wise learning-rate decay ------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone, first, last, depth",
    [
        # depth: the blocks above the first. resnet18: stem, 8 residual blocks.
        ("resnet18", "layer1.0.conv1.weight", "layer4.1.conv1.weight", 7),
        # test_vit: patch embedding, 6 blocks, the final norm grouped with the last block.
        ("test_vit", "blocks.0.attn.qkv.weight", "norm.weight", 5),
    ],
)
def test_layer_decay_scales_the_scheduled_lr_by_depth(backbone, first, last, depth):
    decay, lr = 0.5, 1e-2
    cfg = tiny_cfg(
        backbone,
        f"optim.layer_decay={decay}",
        f"optim.lr={lr}",
        "optim.head_lr_scale=4",
        "optim.warmup_epochs=0",
    )
    system, optimizer, scheduler = system_at_step(cfg, steps=3)
    model = system.method.backbone.model
    params = dict(model.named_parameters())
    # The cosine schedule's lr after 3 of 10 steps, which every group scales.
    scheduled = 0.5 * lr * (1 + torch.cos(torch.tensor(torch.pi * 3 / 10)).item())
    assert lr_of(optimizer, params[last]) == pytest.approx(scheduled)
    assert lr_of(optimizer, params[first]) == pytest.approx(scheduled * decay**depth)
    assert lr_of(optimizer, system.method.head.weight) == pytest.approx(scheduled * 4)
    # Without layer decay every pretrained tensor moves at the scheduled lr.
    _, plain, _ = system_at_step(tiny_cfg(backbone, f"optim.lr={lr}", "optim.warmup_epochs=0"), 3)
    pretrained = [g["lr"] for g in plain.param_groups if g.get("lr_scale", 1) == 1]
    assert pretrained and all(lr == pytest.approx(scheduled) for lr in pretrained)


# ---- frozen norm layers -----------------------------------------------------------------------
def train_steps(system: FGVCSystem, optimizer, steps: int = 2) -> None:
    """Steps the way Lightning takes them: train mode, forward, backward, hooks, step."""
    system.train()
    system.on_train_epoch_start()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = Batch(torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0]))
        loss = system.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        system.on_before_optimizer_step(optimizer)
        optimizer.step()
        system.train()  # Lightning's mode switches (e.g. around validation) keep norms frozen


@pytest.mark.parametrize("backbone", ["resnet18", "test_vit"])
def test_frozen_norms_keep_statistics_and_affine_parameters(backbone):
    cfg = tiny_cfg(backbone, "model.freeze_norm=true", "optim.scheduler=none")
    system, optimizer, _ = system_at_step(cfg, steps=0)
    system.log = lambda *a, **k: None
    norms = pretrained_norms(system.method)
    assert norms and all(isinstance(m, NORM_TYPES) for m in norms)
    before = {k: v.clone() for k, v in system.method.state_dict().items()}
    norm_keys = {
        f"backbone.model.{n}.{k}"
        for n, m in system.method.backbone.model.named_modules()
        if m in norms
        for k in m.state_dict()
    }
    train_steps(system, optimizer)
    after = system.method.state_dict()
    assert norm_keys and all(torch.equal(before[k], after[k]) for k in norm_keys)
    assert all(not m.training for m in norms)
    assert not torch.equal(before["head.weight"], after["head.weight"])  # the rest learns
    others = [k for k in before if k not in norm_keys and k.startswith("backbone.model.")]
    assert any(not torch.equal(before[k], after[k]) for k in others)


def test_without_freezing_batchnorm_statistics_move():
    cfg = tiny_cfg("resnet18", "optim.scheduler=none")
    system, optimizer, _ = system_at_step(cfg, steps=0)
    system.log = lambda *a, **k: None
    before = system.method.backbone.model.bn1.running_mean.clone()
    train_steps(system, optimizer)
    assert not torch.equal(before, system.method.backbone.model.bn1.running_mean)


# ---- stages -----------------------------------------------------------------------------------
def test_stage_config_shape_and_errors():
    cfg = Config.load(
        None,
        [
            "optim.lr=0.01",
            "optim.stages=[{epochs: 3, freeze_norm: true}, "
            "{epochs: 1, lr: 0.001, freeze_backbone: true, sampler: balanced}]",
        ],
    )
    assert cfg.trainer.epochs == 4  # the stages' sum unless set
    assert Config.from_dict(cfg.to_dict()).optim.stages == cfg.optim.stages
    with pytest.raises(ConfigError, match=r"optim.stages\[1\].sampler"):
        Config.load(None, ["optim.stages=[{epochs: 1}, {epochs: 1, sampler: rare}]"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim.stages\[0\].epochs'"):
        Config.load(None, ["optim.stages=[{epoch: 1}]"])
    with pytest.raises(ConfigError, match=r"trainer.epochs=5: .* \(3 \+ 1 = 4\)"):
        Config.load(
            None, ["trainer.epochs=5", "optim.stages=[{epochs: 3}, {epochs: 1}]"]
        ).validate()


def test_stage_schedule_restarts_from_each_stage_lr():
    cfg = tiny_cfg(
        "resnet18",
        "optim.lr=0.01",
        "optim.warmup_epochs=0",
        "optim.stages=[{epochs: 1}, {epochs: 1, lr: 0.001}]",
    )
    # Step 10 is the first step of the second stage (10 steps an epoch): its full lr.
    system, optimizer, scheduler = system_at_step(cfg, steps=10, epochs=2)
    head = system.method.head.weight
    assert lr_of(optimizer, system.method.backbone.model.conv1.weight) == pytest.approx(0.001)
    # Half-way through stage 2: the cosine over its own 10 steps.
    system._trainer.global_step, system._trainer.current_epoch = 15, 1
    system.lr_scheduler_step(scheduler, None)
    assert lr_of(optimizer, system.method.backbone.model.conv1.weight) == pytest.approx(0.0005)
    assert lr_of(optimizer, head) == pytest.approx(0.0005)  # head_lr_scale 1
    # Back in stage 1 (e.g. a resume at step 5): stage 1's own cosine from 0.01.
    system._trainer.global_step, system._trainer.current_epoch = 5, 0
    system.lr_scheduler_step(scheduler, None)
    assert lr_of(optimizer, head) == pytest.approx(0.005)


def test_stage_sampler_switches_by_epoch():
    cfg = Config.load(None, ["optim.stages=[{epochs: 2}, {epochs: 1, sampler: balanced}]"])
    labels = [0] * 9 + [1]
    weights = _sampling_weights(cfg, labels)
    assert callable(weights) and weights(0) is None and weights(1) is None
    assert torch.allclose(weights(2)[-1], torch.tensor(0.5, dtype=torch.float64))
    sampler = EpochSampler(len(labels), seed=0, weights=weights)
    sampler.set_epoch(2)
    drawn = [i for i, _ in sampler for _ in range(1)]
    assert len(drawn) == 10 and drawn.count(9) > 1  # the rare class drawn as often as the other
    sampler.set_epoch(0)
    assert sorted(i for i, _ in sampler) == list(range(10))  # a plain shuffle in stage 1


def test_stages_refused_for_a_streamed_sampler(tmp_path):
    from lookcloser.engine.datamodule import build_datamodule

    cfg = Config.load(None, ["optim.stages=[{epochs: 1, sampler: balanced}]"])
    data = SimpleNamespace(index=object(), unlabelled=[])
    with pytest.raises(ConfigError, match="streamed shards"):
        build_datamodule(cfg, data, None, None)


# ---- a two-stage run, end to end (the real engine), killed mid-stage 2 and resumed ---------------
def two_stage(root, out, *extra: str) -> list[str]:
    return [
        "data.source=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.crop_pct=1.0",
        "data.val_fraction=0",
        "model.backbone=test_resnet",
        "model.pretrained=false",
        "trainer.progress=none",
        "trainer.deterministic=true",
        "trainer.checkpoint_every_n_steps=1",
        "optim.stages=[{epochs: 1, freeze_norm: true}, "
        "{epochs: 2, freeze_backbone: true, sampler: balanced, lr: 0.01}]",
        f"out={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from lookcloser.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("set"), 3, 8, 2, 32, seed=1)


class Snapshot:
    """A Lightning callback that records the method's weights at each epoch's end."""

    def __init__(self):
        import lightning as L

        outer = self

        class Callback(L.Callback):
            def on_train_epoch_end(self, trainer, module):
                outer.epochs.append({k: v.clone() for k, v in module.method.state_dict().items()})

        self.epochs: list[dict] = []
        self.callback = Callback()


def test_two_stage_run_freezes_the_backbone_in_stage_two(tiny_set, tmp_path):
    snap = Snapshot()
    result = api.train(
        overrides=two_stage(tiny_set, tmp_path / "run"), progress=False, callbacks=[snap.callback]
    )
    assert len(snap.epochs) == 3 and result is not None
    first, second, third = snap.epochs
    backbone = [k for k in first if k.startswith("backbone.model.")]
    bn = [k for k in backbone if ".running_" in k or "bn" in k]
    convs = [k for k in backbone if k not in bn]
    # Stage 2: the whole backbone (weights and norm statistics) as stage 1 left it.
    for k in backbone:
        assert torch.equal(first[k], third[k]), k
    assert not torch.equal(first["head.weight"], second["head.weight"])
    assert not torch.equal(second["head.weight"], third["head.weight"])
    assert convs and bn
    record = json.loads((tmp_path / "run" / "model.json").read_text())
    assert record["training"]["epochs"] == 3


def test_two_stage_run_killed_mid_stage_two_resumes_exactly(tiny_set, tmp_path):
    """Stopped (an exception before step 8 of 9: mid stage 2's second epoch) and resumed from
    the last checkpoint, the run ends with the uninterrupted run's weights."""
    import lightning as L

    full = api.train(overrides=two_stage(tiny_set, tmp_path / "full"), progress=False)

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 7:
                raise Interrupted

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        api.train(overrides=two_stage(tiny_set, out), progress=False, callbacks=[Stop()])
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 7 and saved["epoch"] == 2
    api.train(overrides=[*two_stage(tiny_set, out), "trainer.resume=last"], progress=False)
    a = load_file(str(full.run_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


class Interrupted(Exception):
    """Stands in for a kill (tests/flows/test_kill_resume.py uses SIGKILL)."""


# ---- EMA ---------------------------------------------------------------------------------------
def test_ema_weights_are_the_saved_weights(tiny_set, tmp_path):
    import lightning as L

    seen = {}

    class Grab(L.Callback):
        def on_train_end(self, trainer, module):
            seen["ema"] = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
            seen["raw"] = {k: v.clone() for k, v in module.method.state_dict().items()}

    overrides = two_stage(tiny_set, tmp_path / "ema", "trainer.ema_decay=0.5")
    overrides = [o for o in overrides if not o.startswith("optim.stages")] + ["trainer.epochs=1"]
    api.train(overrides=overrides, progress=False, callbacks=[Grab()])
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.equal(saved[k], seen["ema"][k]) for k in saved)
    assert any(not torch.equal(saved[k], seen["raw"][k]) for k in saved)


# ---- every method: freezing reaches its networks, never its new modules --------------------------
CONTRACT_OPTIONS = {  # as tests/unit/test_contract.py, for 64 px inputs
    "dcl": ["method.regions=2", "method.neighbourhood=1"],
    "tasn": ["method.attention_channels=32"],
    "racnn": ["method.scales=2", "method.apn_channels=8", "method.apn_hidden=16"],
    "dcn": [
        "method.patch_size=16",
        "method.glimpses=3",
        "method.coarse_stage=2",
        "method.top_channels=32",
    ],
}


def builtin_methods() -> list[str]:
    from lookcloser.methods import _import_builtin_methods
    from lookcloser.methods.base import METHODS

    _import_builtin_methods()
    return sorted(n for n, c in METHODS.items() if c.__module__.startswith("lookcloser."))


@pytest.mark.parametrize("name", builtin_methods())
def test_freezing_composes_with_every_method(name):
    from lookcloser.engine.finetune import Freezer, backbone_modules

    cfg = tiny_cfg(
        "test_resnet", f"method.name={name}", "data.image_size=64", *CONTRACT_OPTIONS.get(name, [])
    )
    torch.manual_seed(0)
    method = build_method(cfg, 3).train()
    freezer = Freezer(method)
    freezer.apply(freeze_norm=True, freeze_backbone=False)
    norms = pretrained_norms(method)
    assert norms and all(not m.training for m in norms)
    new = {id(p) for m in method.new_modules() for p in m.parameters()}
    assert not any(id(p) in new for m in norms for p in m.parameters())

    freezer.apply(freeze_norm=False, freeze_backbone=True)
    inside = [m for b in backbone_modules(method) for m in b.modules() if isinstance(m, NORM_TYPES)]
    assert inside and all(not m.training for m in inside)  # a frozen backbone keeps its stats
    frozen = {id(p) for b in backbone_modules(method) for p in b.parameters()}
    assert frozen and all(
        not p.requires_grad for b in backbone_modules(method) for p in b.parameters()
    )
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in frozen for p in trainable)
    losses = method.training_losses(Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])))
    losses["loss"].backward()
    freezer.drop_gradients()
    assert all(p.grad is None for b in backbone_modules(method) for p in b.parameters())
    # Released again, everything the stage froze trains.
    freezer.apply(freeze_norm=False, freeze_backbone=False)
    assert all(p.requires_grad for b in backbone_modules(method) for p in b.parameters())
    assert all(m.training for m in inside)
