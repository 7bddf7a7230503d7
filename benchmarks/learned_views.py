"""What trained STNs and RA-CNN attention proposals look at, over a run's test images.

    python benchmarks/learned_views.py "runs/cars66-stn-s0=data/cars66/test/*/*" ...

Per run: the share of the image side the next view shows (STN: the square root of |det A|,
A the 2 x 2 part of the transform; RA-CNN: the APN square's side over the image side; 1 =
the whole image), the mean offset of its centre from the image centre in pixels of the
model's input, and for an STN the largest entry of |theta - identity| over the images (0.01
is about a pixel's shift at 128 px, or 1 % of scale).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from lookcloser.methods.racnn import RACNN  # noqa: E402
from lookcloser.models.backbones import Backbone  # noqa: E402
from lookcloser.predictor import Predictor  # noqa: E402


def summary(share: torch.Tensor) -> str:
    return f"{share.mean():.3f} ({share.min():.3f} to {share.max():.3f})"


def views(run: str, pattern: str, limit: int) -> list[str]:
    predictor = Predictor.load(run)
    method = predictor.method
    files = sorted(glob.glob(pattern))[:limit]
    if not files:
        raise SystemExit(f"{pattern}: no images")
    with torch.inference_mode():
        images = torch.stack([predictor.transform(Image.open(f).convert("RGB")) for f in files])
        side = images.shape[-1]
        stns = [m for m in method.modules() if isinstance(m, Backbone) and m.stn]
        if stns:
            theta = stns[0].stn.theta(images, stns[0].normalize(images))
            share = theta[:, :, :2].det().abs().sqrt()
            offset = theta[:, :, 2].norm(dim=1) * side / 2  # [-1, 1] coordinates -> pixels
            drift = f"{(theta - torch.eye(2, 3)).abs().amax():.4f}"
            kind = "STN"
        elif isinstance(method, RACNN):
            square = method.look_closer(images).squares[0]  # (tx, ty, tl) in pixels
            share = 2 * square[:, 2] / side
            offset = (square[:, :2] - side / 2).norm(dim=1)
            drift, kind = "", "RA-CNN scale 1 -> 2"
        else:
            raise SystemExit(f"{run}: neither model.stn nor RA-CNN")
    name = "/".join(Path(run).parts[-2:])
    return [name, kind, str(len(files)), summary(share), f"{offset.mean():.2f}", drift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN=GLOB", help="model dir = its test images")
    parser.add_argument("--limit", type=int, default=1000, help="images per run (sorted)")
    parser.add_argument("--section", default="learned-views")
    args = parser.parse_args()
    rows = [views(*spec.split("=", 1), args.limit) for spec in args.runs]
    command = "python benchmarks/learned_views.py " + " ".join(f'"{a}"' for a in args.runs)
    text = (
        "## Where trained STNs and RA-CNN proposals look\n\n"
        f"Command: `{command}`. Machine: {machine()}.\n\n"
        + markdown_table(
            [
                "run",
                "view",
                "images",
                "share of the image side, mean (range)",
                "centre offset, px",
                "max abs(theta - I)",
            ],
            rows,
        )
    )
    print(text)
    write_section(args.section, text)


if __name__ == "__main__":
    main()
