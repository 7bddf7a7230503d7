"""How far trained spatial transformers moved from the identity, over a run's test images.

    python benchmarks/stn_warps.py "runs/cars66-stn-s0=data/cars66/test/*/*" ...

Per run: the mean of the transform's zoom (the square root of |det A|, A the 2 x 2 part: < 1
zooms in), the mean shift in pixels of the model's input, and the largest entry of
|theta - identity| over the images (0.01 is a pixel's shift at 128 px and 1 % of scale).
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

from lookcloser.models.backbones import Backbone  # noqa: E402
from lookcloser.predictor import Predictor  # noqa: E402


def warps(run: str, pattern: str, limit: int) -> list[str]:
    predictor = Predictor.load(run)
    stns = [m for m in predictor.method.modules() if isinstance(m, Backbone) and m.stn]
    if not stns:
        raise SystemExit(f"{run}: no model.stn in this model")
    backbone = stns[0]
    files = sorted(glob.glob(pattern))[:limit]
    if not files:
        raise SystemExit(f"{pattern}: no images")
    with torch.inference_mode():
        images = torch.stack([predictor.transform(Image.open(f).convert("RGB")) for f in files])
        theta = backbone.stn.theta(images, backbone.normalize(images))
    zoom = theta[:, :, :2].det().abs().sqrt()
    shift = theta[:, :, 2].norm(dim=1) * images.shape[-1] / 2  # [-1, 1] coordinates -> pixels
    offset = (theta - torch.eye(2, 3)).abs().amax(dim=(1, 2))
    return [
        "/".join(Path(run).parts[-2:]),
        str(len(files)),
        f"{zoom.mean():.3f} ({zoom.min():.3f} to {zoom.max():.3f})",
        f"{shift.mean():.2f}",
        f"{offset.max():.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN=GLOB", help="model dir = its test images")
    parser.add_argument("--limit", type=int, default=256, help="images per run (sorted)")
    parser.add_argument("--section", default="stn-warps")
    args = parser.parse_args()
    rows = [warps(*spec.split("=", 1), args.limit) for spec in args.runs]
    command = "python benchmarks/stn_warps.py " + " ".join(f'"{a}"' for a in args.runs)
    text = (
        "## How far the trained spatial transformers warp\n\n"
        f"Command: `{command}`. Machine: {machine()}.\n\n"
        + markdown_table(
            ["run", "images", "zoom, mean (range)", "mean shift, px", "max abs(theta - I)"], rows
        )
    )
    print(text)
    write_section(args.section, text)


if __name__ == "__main__":
    main()
