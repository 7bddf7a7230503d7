"""Cost of a method against the baseline on the same backbone: training step and inference.

Training step: images/s of original images through `training_losses` + backward + AdamW
(DCL adds a destroyed copy of each image, so about 2x the baseline's cost is expected).
Inference: images/s of the saved model (`for_inference()`) against the baseline's, plus
parameter counts and FLOPs of both inference graphs. Ratios come from interleaved runs.
When it writes its table it also appends a cost record to benchmarks/records/cost.jsonl
(the ratios, under --name: name it after the accuracy.py entry it measures), which
benchmarks/results.py puts in the leaderboards.

    python benchmarks/method_cost.py --method dcl method.regions=4 method.neighbourhood=1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import append_records, machine, markdown_table, write_section  # noqa: E402
from throughput import interleaved  # noqa: E402

from lookcloser.config import Config  # noqa: E402
from lookcloser.data.batch import Batch  # noqa: E402
from lookcloser.engine.module import count_parameters  # noqa: E402
from lookcloser.methods import build_method  # noqa: E402


def build(name: str, backbone: str, size: int, classes: int, options: list[str]):
    cfg = Config()
    # data.image_size matters to methods that resample to it (TASN's sampler output).
    cfg.apply_overrides(
        [
            f"model.backbone={backbone}",
            "model.pretrained=false",
            f"data.image_size={size}",
            f"method.name={name}",
            *options,
        ]
    )
    torch.manual_seed(0)
    return build_method(cfg, classes)


def graph_parameters(module, images) -> int:
    """Parameters of the modules the forward pass runs (stored-but-unused tensors excluded).

    Counted by forward hooks rather than by gradients: TASN's attention network runs at
    inference but gets no gradient through its (non-differentiable) sampler.
    """
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: ran.add(m)) for m in module.modules()]
    with torch.inference_mode():
        module(images)
    for hook in hooks:
        hook.remove()
    unique = {id(p): p for m in ran for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in unique.values())


def flops(module, images) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(images)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="dcl")
    parser.add_argument("options", nargs="*", help="method.<option>=value for the method")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--model",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model.* overrides for both models, e.g. model.kwargs.img_size=128 (put the "
        "method's options before this flag)",
    )
    parser.add_argument(
        "--name",
        help="what the tables call the measured model (default: the method's name); "
        "for a plug-in on the baseline, e.g. --method baseline model.attention=se --name se",
    )
    parser.add_argument(
        "--reference",
        help="the accuracy.py entry the baseline of this measurement is (default: baseline, "
        "or 'baseline with <--model options>' when --model is given), e.g. hybrid for "
        "--backbone vit_tiny_lite0_s16 --model model.kwargs.img_size=128 model.kwargs.depth=6",
    )
    parser.add_argument("--section", help="docs/benchmarks.md section (default: cost-NAME)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    name = args.name or args.method
    images = torch.rand(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.batch,))
    base = build(
        "baseline",
        args.backbone,
        args.size,
        args.classes,
        ["method.label_smoothing=0.0", *args.model],
    )
    other = build(args.method, args.backbone, args.size, args.classes, [*args.model, *args.options])

    def stepper(method, x=images, y=labels):
        method.train()
        opt = torch.optim.AdamW(method.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            method.training_losses(Batch(x, y))["loss"].backward()
            opt.step()

        return step

    # The baseline on twice the images in one batch: what DCL's originals + destroyed batch
    # costs the backbone, so DCL's own overhead can be told from the batch-size effect.
    double = (torch.cat([images, images.flip(-1)]), torch.cat([labels, labels]))
    train_o2, train_b2 = interleaved(
        stepper(other), stepper(base, *double), args.batch, args.iters, args.rounds
    )

    train_o, train_b = interleaved(
        stepper(other), stepper(base), args.batch, args.iters, args.rounds
    )
    inf_o, inf_b = other.for_inference().eval(), base.eval()
    used = (graph_parameters(inf_o, images[:1]), graph_parameters(inf_b, images[:1]))

    def forward(module):
        def run():
            with torch.inference_mode():
                module(images)

        return run

    infer_o, infer_b = interleaved(
        forward(inf_o), forward(inf_b), args.batch, args.iters * 3, args.rounds
    )
    one = images[:1]
    flops_o, flops_b = flops(inf_o, one), flops(inf_b, one)
    where = f"{args.backbone}, batch {args.batch}, {args.size} px"
    rows = [
        [
            where,
            f"training step, {name} / baseline (same originals)",
            f"{train_o:.1f} / {train_b:.1f}",
            f"**{train_b / train_o:.2f}x** the cost",
        ],
        [
            where,
            f"training step, {name} / baseline on the same batch doubled (2B images)",
            f"{train_o2:.1f} / {train_b2:.1f} (originals/s)",
            f"**{train_b2 / train_o2:.2f}x** the cost",
        ],
        [
            where,
            f"inference, saved {name} model / baseline",
            f"{infer_o:.1f} / {infer_b:.1f}",
            f"**{infer_o / infer_b:.3f}**",
        ],
        [
            where,
            "parameters used by the inference graph",
            f"{used[0]:,} / {used[1]:,}",
            f"stored: {count_parameters(inf_o):,} / {count_parameters(inf_b):,}",
        ],
        [
            where,
            "inference FLOPs per image (saved model / baseline)",
            f"{flops_o:,} / {flops_b:,}",
            "",
        ],
    ]
    command = "python benchmarks/method_cost.py " + " ".join(sys.argv[1:])
    text = (
        f"## Cost of {name} against the baseline\n\n"
        f"Command: `{command.strip()}`. Machine: {machine()}. Medians of {args.rounds} interleaved rounds.\n\n"
        + markdown_table(["setting", "measure", f"{name} / baseline", "result"], rows)
    )
    print(text)
    if not args.no_write:
        section = args.section or f"cost-{name}"
        write_section(section, text)
        reference = args.reference or (
            "baseline" if not args.model else "baseline with " + " ".join(args.model)
        )
        append_records(
            "cost",
            [
                {
                    "kind": "cost",
                    "script": "method_cost.py",
                    "dataset": None,  # random tensors: the ratio holds for any set
                    "entry": name,
                    "reference": reference,
                    "tta": "none",
                    "backbone": args.backbone,
                    "size": args.size,
                    "batch": args.batch,
                    "classes": args.classes,
                    "options": [*args.options, *args.model],
                    "training_cost": train_b / train_o,
                    "training_cost_doubled_batch": train_b2 / train_o2,
                    "inference_speed": infer_o / infer_b,
                    "inference_flops": [flops_o, flops_b],
                    "inference_parameters": list(used),
                    "how": "method_cost.py: training step time and images/s of the saved "
                    f"model against the baseline's, random batches of {args.batch}",
                    "section": section,
                    "command": command.strip(),
                }
            ],
        )


if __name__ == "__main__":
    main()
