"""Metadata fusion (model.fusion=add|concat|gate): the encoders, the image-only path it starts
from and falls back to, the date -> day_of_year key, and the synthetic set's class-linked
metadata."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lookcloser.api import as_config, check_config
from lookcloser.config import SyntheticConfig
from lookcloser.data.meta import meta_tensors
from lookcloser.data.sources import Sample, numeric_meta_keys
from lookcloser.errors import ConfigError, DataError
from lookcloser.models.fusion import FusedHead, MetaEncoder, MetaFusion, day_circle, sphere_point
from lookcloser.models.heads import build_head

KEYS = ["latitude", "longitude", "day_of_year", "elevation"]
MODES = ["add", "concat", "gate"]


def encode(keys, rows):
    meta = torch.tensor(rows, dtype=torch.float32)
    return MetaEncoder(keys)(meta, torch.ones_like(meta, dtype=torch.bool))


# ---- encoders ---------------------------------------------------------------------------------
def test_location_is_continuous_across_the_date_line_and_the_poles():
    east, west, greenwich = encode(["lat", "lon"], [[10, 179.9], [10, -179.9], [10, 0.0]])
    assert (east - west).norm() < 0.01  # 0.2 degrees apart on the globe
    assert (east - greenwich).norm() > 1.5
    north = encode(["latitude", "lng"], [[90, 0], [90, 120], [90, -75]])
    assert torch.cdist(north, north).max() < 1e-6  # every longitude is the same pole
    torch.testing.assert_close(
        sphere_point(torch.tensor(0.0), torch.tensor(90.0)).norm(), torch.tensor(1.0)
    )


def test_day_of_year_is_continuous_across_new_year():
    dec31, jan1, midsummer = encode(["day_of_year"], [[365], [1], [182]])
    leap_dec31 = encode(["doy"], [[366]])[0]
    assert (dec31 - jan1).norm() < 0.05 and (leap_dec31 - jan1).norm() < 0.05
    assert (dec31 - midsummer).norm() > 1.9  # opposite sides of the year
    torch.testing.assert_close(day_circle(torch.tensor(1.0)), torch.tensor([0.0, 1.0]))


def test_encoder_masks_each_part_and_keeps_the_presence_bit():
    encoder = MetaEncoder(KEYS)
    assert encoder.out_features == 4 + 3 + 2
    meta = torch.tensor([[10.0, 20.0, 100.0, 3.0], [10.0, 20.0, 100.0, 3.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    full, partial = encoder(meta, mask)
    assert full[3] == 1 and partial[3] == 0  # location needs latitude and longitude
    assert partial[:3].abs().sum() == 0 and partial[7:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(partial[4:7], full[4:7])  # the date is kept
    assert encoder.describe()[0] == "latitude, longitude: point on the unit sphere"


def test_encoder_key_errors_name_the_keys():
    with pytest.raises(ConfigError, match="a latitude without a longitude key"):
        MetaEncoder(["lat", "elevation"])
    with pytest.raises(ConfigError, match="'lat' and 'latitude' both name the latitude"):
        MetaEncoder(["lat", "latitude", "lon"])


# ---- fusion: the image-only path ---------------------------------------------------------------------
def fused_head(mode: str, zero_start: bool = True) -> FusedHead:
    torch.manual_seed(0)
    fusion = MetaFusion(KEYS, 8, mode, hidden=16, dropout=0.0)
    if not zero_start:
        torch.nn.init.normal_(fusion.mlp[-1].weight)
        torch.nn.init.normal_(fusion.mlp[-1].bias)
    return FusedHead(fusion, build_head("linear", fusion.out_features, 5)).eval()


def sample_meta(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    meta = torch.rand(n, len(KEYS), generator=gen) * 100
    return meta, torch.rand(n, len(KEYS), generator=gen) > 0.2


@pytest.mark.parametrize("mode", MODES)
def test_new_fusion_gives_the_image_only_output(mode):
    """The MLP's last layer starts at zero: before training, metadata changes nothing."""
    head = fused_head(mode)
    x = torch.randn(6, 8)
    image_only = head.classifier(head.fusion(x))
    torch.testing.assert_close(head(x, *sample_meta()), image_only)
    torch.testing.assert_close(head(x), image_only)
    if mode != "concat":
        torch.testing.assert_close(image_only, head.classifier(x))


@pytest.mark.parametrize("mode", MODES)
def test_masked_metadata_is_no_metadata(mode):
    head = fused_head(mode, zero_start=False)
    x = torch.randn(6, 8)
    meta, mask = sample_meta()
    with torch.no_grad():
        informed = head(x, meta, mask)
        assert not torch.allclose(informed, head(x))  # the metadata counts
        nothing = torch.zeros_like(mask)
        torch.testing.assert_close(head(x, meta, nothing), head(x))
        # Values under the mask are never read.
        torch.testing.assert_close(head(x, torch.where(mask, meta, 1e6), mask), informed)


def test_meta_dropout_masks_whole_samples_in_training_only():
    head = fused_head("add", zero_start=False)
    head.fusion.dropout = 1.0  # every sample dropped (the config keeps it below 1)
    x, (meta, mask) = torch.randn(6, 8), sample_meta()
    with torch.no_grad():
        head.train()
        torch.testing.assert_close(head(x, meta, mask), head(x))
        head.fusion.dropout = 0.5
        torch.manual_seed(0)  # draws .496 .768 .089 .132 .307 .634: 0, 2-4 dropped
        partly = head(x, meta, mask)
        head.eval()
        informed, image_only = head(x, meta, mask), head(x)
    rows_dropped = [torch.allclose(p, i) for p, i in zip(partly, image_only, strict=True)]
    rows_kept = [torch.allclose(p, i) for p, i in zip(partly, informed, strict=True)]
    assert rows_dropped == [True, False, True, True, True, False]
    assert rows_kept == [False, True, False, False, False, True]


def test_gate_reads_the_image_too():
    head = fused_head("gate", zero_start=False)
    meta, mask = sample_meta(2)
    x = torch.randn(1, 8).expand(2, 8)
    with torch.no_grad():
        shift = head.fusion(x, meta, mask) - x
        other = head.fusion(2 * x, meta, mask) - 2 * x
    assert not torch.allclose(shift, other)  # the gate depends on the image features


# ---- config rules -------------------------------------------------------------------------------
def test_fusion_and_meta_keys_go_together():
    keys = "data.meta_keys=[latitude, longitude]"
    with pytest.raises(ConfigError, match="set model.fusion=add|concat|gate"):
        check_config(as_config(None, [keys]))
    with pytest.raises(ConfigError, match="model.fusion=add: no metadata to fuse"):
        check_config(as_config(None, ["model.fusion=add"]))
    with pytest.raises(ConfigError, match="a longitude without a latitude"):
        check_config(as_config(None, ["model.fusion=add", "data.meta_keys=[lon]"]))
    for method in ("baseline", "dcl", "tasn", "racnn"):
        check_config(as_config(None, [keys, "model.fusion=gate", f"method.name={method}"]))


# ---- the date -> day_of_year key ---------------------------------------------------------------------
def test_day_of_year_is_derived_from_an_iso_date():
    metas = [
        {"date": "2021-12-31"},
        {"date": "2020-12-31 17:07:00+00:00"},  # iNat 2021's form; 2020 is a leap year
        {"date": ""},
        {"day_of_year": 5, "date": "2021-03-01"},  # the sample's own value wins
        {},
    ]
    values, mask = meta_tensors(metas, ["day_of_year"])
    assert values[:, 0].tolist() == [365, 366, 0, 5, 0]
    assert mask[:, 0].tolist() == [True, True, False, True, False]
    with pytest.raises(DataError, match="b.jpg: meta 'date': expected an ISO date"):
        meta_tensors([{"date": "31/12/2021"}], ["day_of_year"], ["b.jpg"])
    samples = [Sample("a", 0, {"date": "2021-06-01", "lat": 3.0}), Sample("b", 0, {"date": "x"})]
    assert numeric_meta_keys(samples) == ["day_of_year", "lat"]


# ---- the synthetic set's metadata --------------------------------------------------------------------
def test_synthetic_metadata_is_tied_to_the_class(tmp_path):
    from lookcloser.data.synthetic import class_home, class_names, synthetic_source

    cfg = as_config(
        None,
        [
            f"data.root={tmp_path}",
            "data.synthetic.classes=3",
            "data.synthetic.per_class=30",
            "data.synthetic.test_per_class=2",
            "data.synthetic.size=32",
            "data.synthetic.meta=true",
        ],
    ).data
    splits = synthetic_source(cfg)
    plain = synthetic_source(dataclasses.replace(cfg, synthetic=SyntheticConfig(3, 30, 2, 32)))
    assert not any(s.meta for s in plain.train)  # metadata only when asked for
    located = [s for s in splits.train if "latitude" in s.meta]
    dated = [s for s in splits.train if "date" in s.meta]
    assert 0.75 * 90 < len(located) < 90 and 0.75 * 90 < len(dated) < 90  # ~10% missing each
    order = class_names(3)  # the generator's class index
    homes = torch.tensor([class_home(0, order.index(name))[:2] for name in splits.classes])
    points = torch.tensor([[s.meta["latitude"], s.meta["longitude"]] for s in located])
    labels = torch.tensor([s.label for s in located])
    # Each image lies nearer its own class's home than the other classes' homes do, on average.
    gaps = torch.cdist(sphere_point(*points.T), sphere_point(*homes.T))  # images x classes
    own = gaps[torch.arange(len(labels)), labels]
    others = gaps.sum(1).sub(own).div(2)
    assert own.mean() < 0.7 * others.mean()
    again = synthetic_source(cfg)
    assert [s.meta for s in again.test] == [s.meta for s in splits.test]  # deterministic
    assert "day_of_year" in numeric_meta_keys(splits.train)
    values, mask = meta_tensors([s.meta for s in dated], ["day_of_year"])
    assert mask.all() and ((values >= 1) & (values <= 366)).all()
    assert math.isfinite(float(values.mean()))
