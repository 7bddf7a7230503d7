"""Metadata fusion in front of a class head (`model.fusion=add|concat|gate`).

The declared metadata (`data.meta_keys`: B x K values, B x K presence mask) is encoded by key
name, mapped by a small MLP to an embedding and joined with the image embedding before the
classifier, as in the iNat 2021 winning recipe:

* latitude (`lat`, `latitude`) and longitude (`lon`, `lng`, `long`, `longitude`), in degrees,
  become one point on the unit sphere (x, y, z): 179.9 and -179.9 degrees east are neighbours,
  and so are all longitudes at a pole. Both must be present for the location to count.
* the day of the year (`day_of_year`, `doy`; 1-366, `data.meta` derives it from a `date`)
  becomes (sin, cos) of its angle on a 365.25-day circle: 31 December is next to 1 January.
* any other key is taken as it is (give it on a scale near 1).

Each part is multiplied by its presence and followed by the presence bit, so a missing value
is told apart from a value of 0. A sample with no metadata at all (every value masked, or no
metadata given) gets exactly the image-only output: its embedding is 0, the MLP's last layer
starts at 0 (a new model starts as the image-only one) and `meta_dropout` trains that path
by masking whole samples' metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lookcloser.errors import ConfigError
from lookcloser.models.gradients import input_gradient

LATITUDE_KEYS = ("lat", "latitude")
LONGITUDE_KEYS = ("lon", "lng", "long", "longitude")
DAY_KEYS = ("day_of_year", "doy")
DAYS_PER_YEAR = 365.25
FUSIONS = ("add", "concat", "gate")


def sphere_point(latitude: Tensor, longitude: Tensor) -> Tensor:
    """... x 3 unit vectors of latitudes and longitudes in degrees."""
    lat, lon = latitude * (math.pi / 180), longitude * (math.pi / 180)  # (no deg2rad in ONNX)
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def day_circle(day_of_year: Tensor) -> Tensor:
    """... x 2 (sin, cos) of the day of the year (1 = 1 January) on a 365.25-day circle."""
    angle = (day_of_year - 1) * (2 * math.pi / DAYS_PER_YEAR)
    return torch.stack([angle.sin(), angle.cos()], dim=-1)


def _find(names: list[str], aliases: Sequence[str], what: str) -> int | None:
    found = [i for i, n in enumerate(names) if n in aliases]
    if len(found) > 1:
        raise ConfigError(
            f"data.meta_keys: {' and '.join(repr(names[i]) for i in found)} both name the {what}; "
            "declare one"
        )
    return found[0] if found else None


class MetaEncoder(nn.Module):
    """B x K metadata and mask -> B x F features by key name (see the module docstring)."""

    def __init__(self, keys: Sequence[str]):
        super().__init__()
        names = [k.strip().lower() for k in keys]
        lat = _find(names, LATITUDE_KEYS, "latitude")
        lon = _find(names, LONGITUDE_KEYS, "longitude")
        if (lat is None) != (lon is None):
            have, need = (
                ("latitude", LONGITUDE_KEYS) if lat is not None else ("longitude", LATITUDE_KEYS)
            )
            raise ConfigError(
                f"data.meta_keys: a {have} without a {'longitude' if lat is not None else 'latitude'} "
                f"key ({', '.join(need)}); model.fusion encodes the location as a point on the "
                "sphere and needs both"
            )
        self.location = (lat, lon) if lat is not None else None
        self.day = _find(names, DAY_KEYS, "day of the year")
        used = {lat, lon, self.day}
        self.others = [i for i in range(len(names)) if i not in used]
        self.keys = list(keys)
        self.out_features = (
            4 * bool(self.location) + 3 * (self.day is not None) + 2 * len(self.others)
        )

    def describe(self) -> list[str]:
        """How each key is encoded, for logs and errors."""
        out = []
        if self.location:
            lat, lon = self.location
            out.append(f"{self.keys[lat]}, {self.keys[lon]}: point on the unit sphere")
        if self.day is not None:
            out.append(f"{self.keys[self.day]}: (sin, cos) on the yearly circle")
        out += [f"{self.keys[i]}: as given" for i in self.others]
        return out

    def forward(self, meta: Tensor, present: Tensor) -> Tensor:
        """B x F: each part times its presence, then the presence bit."""
        meta = meta.float()
        parts = []

        def add(values: Tensor, mask: Tensor) -> None:
            flag = mask.to(values.dtype)[:, None]
            parts.extend([values * flag, flag])

        if self.location:
            lat, lon = self.location
            add(sphere_point(meta[:, lat], meta[:, lon]), present[:, lat] & present[:, lon])
        if self.day is not None:
            add(day_circle(meta[:, self.day]), present[:, self.day])
        for i in self.others:
            add(meta[:, i : i + 1], present[:, i])
        return torch.cat(parts, dim=-1)


class MetaFusion(nn.Module):
    """Joins the metadata embedding with a D-wide image embedding.

    add: x + e (e D-wide); concat: [x, e] (e `hidden`-wide); gate: x + sigmoid(W [x, e]) * e,
    where the image decides, per channel, how much of the metadata enters.
    """

    def __init__(
        self,
        meta_keys: Sequence[str],
        in_features: int,
        mode: str = "add",
        hidden: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        if mode not in FUSIONS:
            raise ConfigError(f"model.fusion: expected one of {', '.join(FUSIONS)}, got {mode!r}")
        if not meta_keys:
            raise ConfigError(f"model.fusion={mode}: no metadata to fuse; set data.meta_keys")
        self.encoder = MetaEncoder(meta_keys)
        self.mode = mode
        self.dropout = float(dropout)
        self.in_features = in_features
        width = hidden if mode == "concat" else in_features
        self.mlp = nn.Sequential(
            nn.Linear(self.encoder.out_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, width),
        )
        # Zero last layer: a new model's output is the image-only one until the MLP learns.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Linear(in_features + width, in_features) if mode == "gate" else None
        self.embed_features = width
        self.out_features = in_features + width if mode == "concat" else in_features

    def embedding(self, meta: Tensor, meta_mask: Tensor) -> Tensor:
        """B x E metadata embeddings; 0 for samples with no metadata (or dropped in training)."""
        present = meta_mask.bool()
        if self.training and self.dropout > 0:
            keep = torch.rand(present.shape[0], 1, device=present.device) >= self.dropout
            present = present & keep
        any_present = present.any(dim=-1, keepdim=True)
        embedded = self.mlp(self.encoder(meta, present))
        return torch.where(any_present, embedded, torch.zeros_like(embedded))

    def forward(
        self, x: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        """The fused ... x out_features embeddings (x: B x D, or B x ... x D with one metadata
        row per sample). Without metadata, the image-only path."""
        if meta is None:
            if self.mode != "concat":
                return x
            return torch.cat([x, x.new_zeros(*x.shape[:-1], self.embed_features)], dim=-1)
        if meta_mask is None:
            raise ConfigError("model.fusion: metadata given without its mask (meta_mask)")
        e = self.embedding(meta, meta_mask).to(x.dtype)
        e = e.view(e.shape[0], *[1] * (x.ndim - 2), e.shape[-1]).expand(*x.shape[:-1], -1)
        if self.mode == "add":
            return x + e
        if self.mode == "concat":
            return torch.cat([x, e], dim=-1)
        return x + torch.sigmoid(self.gate(torch.cat([x, e], dim=-1))) * e


class FusedHead(nn.Module):
    """Metadata fusion followed by a registered class head; `head(x)` alone is the image-only
    path (what a method's saliency or CAM reads)."""

    takes_meta = True

    def __init__(self, fusion: MetaFusion, classifier: nn.Module):
        super().__init__()
        self.fusion = fusion
        self.classifier = classifier

    def forward(
        self, x: Tensor, meta: Tensor | None = None, meta_mask: Tensor | None = None
    ) -> Tensor:
        return self.classifier(self.fusion(x, meta, meta_mask))

    def input_gradient(self, x: Tensor, grad: Tensor) -> Tensor:
        """The image-only path's input gradient: without metadata the fusion passes x through
        (concat appends zeros), so only the classifier's part on x remains."""
        fused = self.fusion(x)
        return input_gradient(self.classifier, fused, grad)[..., : x.shape[-1]]
