"""Each FGVC benchmark end to end on a tiny fabricated copy of its official release:
served over HTTP (or placed by hand where the terms say so) -> verified -> extracted -> loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from lookcloser.config import DataConfig
from lookcloser.data import download as dl
from lookcloser.data.info import dataset_info, format_info
from lookcloser.data.meta import meta_tensors
from lookcloser.data.sources import SOURCES, DatasetSplits, Sample, build_source, numeric_meta_keys
from lookcloser.errors import DataError


def _jpeg(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 80, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


def _tgz(files: dict[str, bytes | str], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


def _mat(**variables) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


def _cells(items: list[str]) -> np.ndarray:
    return np.array(items, dtype=object).reshape(-1, 1)


def _lines(rows) -> str:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in rows)


# ---- fabricated releases (same file names and formats as the real ones) ----------------------
def cub_release() -> dict[str, bytes]:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, files = [], {}
    for i in range(1, 7):
        cls = classes[(i - 1) // 2]
        rel = f"{cls}/{cls[4:]}_{i:04d}_{i}.jpg"
        images.append((i, rel))
        files[f"CUB_200_2011/images/{rel}"] = _jpeg(i)
    part_names = [
        "back",
        "beak",
        "belly",
        "breast",
        "crown",
        "forehead",
        "left eye",
        "left leg",
        "left wing",
        "nape",
        "right eye",
        "right leg",
        "right wing",
        "tail",
        "throat",
    ]
    base = "CUB_200_2011/"
    files |= {
        base + "images.txt": _lines(images),
        base + "classes.txt": _lines(enumerate(classes, start=1)),
        base + "image_class_labels.txt": _lines((i, (i - 1) // 2 + 1) for i in range(1, 7)),
        base + "train_test_split.txt": _lines((i, i % 2) for i in range(1, 7)),
        base + "bounding_boxes.txt": _lines((i, 10.0 * i, 20.0, 30.0, 40.5) for i in range(1, 7)),
        base + "parts/parts.txt": _lines(enumerate(part_names, start=1)),
        base + "parts/part_locs.txt": _lines(
            (i, p, float(p), float(i), int(p != 2)) for i in range(1, 7) for p in range(1, 16)
        ),
        # The real file has a few rows with an extra column; keep one such row.
        base + "attributes/image_attribute_labels.txt": _lines(
            [(i, a, int(a == i % 3 + 1), 3, 10.5) for i in range(1, 7) for a in (1, 2, 3)]
            + [(6, 4, 1, 4, 0, 12.0)]
        ),
        "attributes.txt": _lines([(1, "has_bill_shape::curved"), (2, "has_bill_shape::dagger")]),
    }
    return {"CUB_200_2011.tgz": _tgz(files)}


def check_cub(splits: DatasetSplits) -> None:
    assert splits.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert [s.label for s in splits.train] == [0, 1, 2] and len(splits.test) == 3
    first = splits.train[0]
    assert first.path.endswith(
        "images/001.Black_footed_Albatross/Black_footed_Albatross_0001_1.jpg"
    )
    assert first.meta["bbox"] == [10.0, 20.0, 30.0, 40.5]
    assert len(first.meta["parts"]) == 15 and first.meta["parts"][1] == [2.0, 1.0, 0.0]
    assert first.meta["attributes"] == [2]
    assert splits.test[-1].meta["attributes"] == [1, 4]
    assert splits.annotations == ["bbox", "parts", "attributes"]


def nabirds_release() -> dict[str, bytes]:
    classes = {
        0: "Birds",
        1: "Perching Birds",
        2: "Pigeons and Doves",
        295: "Dark-eyed Junco (Oregon)",
        296: "Dark-eyed Junco (Slate-colored)",
        313: "Rock Pigeon",
    }
    labels = [295, 295, 296, 296, 313, 313]
    ids = [f"{i:08x}21dc4d0cbfe14cae3c85c829" for i in range(6)]
    files = {f"nabirds/images/{labels[i]:04d}/{uid}.jpg": _jpeg(i) for i, uid in enumerate(ids)}
    files |= {
        "nabirds/images.txt": _lines(
            (uid, f"{labels[i]:04d}/{uid}.jpg") for i, uid in enumerate(ids)
        ),
        "nabirds/classes.txt": _lines(classes.items()),
        "nabirds/hierarchy.txt": _lines([(295, 1), (296, 1), (313, 2), (1, 0), (2, 0)]),
        "nabirds/image_class_labels.txt": _lines(zip(ids, labels, strict=True)),
        "nabirds/train_test_split.txt": _lines((uid, int(i < 4)) for i, uid in enumerate(ids)),
        "nabirds/bounding_boxes.txt": _lines((uid, 5, 6, 70, 80 + i) for i, uid in enumerate(ids)),
        "nabirds/parts/part_locs.txt": _lines((uid, p, 3, 4, 1) for uid in ids for p in range(11)),
        "nabirds/photographers.txt": _lines((uid, "Someone") for uid in ids),
    }
    return {"nabirds.tar.gz": _tgz(files)}


def check_nabirds(splits: DatasetSplits) -> None:
    assert splits.classes == [
        "Dark-eyed Junco (Oregon)",
        "Dark-eyed Junco (Slate-colored)",
        "Rock Pigeon",
    ]
    assert [s.label for s in splits.train] == [0, 0, 1, 1] and [s.label for s in splits.test] == [
        2,
        2,
    ]
    assert splits.train[0].meta["hierarchy"] == ["Perching Birds", "Birds"]
    assert splits.test[1].meta["bbox"] == [5.0, 6.0, 70.0, 85.0]
    assert splits.test[1].meta["class_id"] == 313 and len(splits.test[1].meta["parts"]) == 11
    assert set(splits.annotations) == {"hierarchy", "bbox", "parts"}


_CAR_FIELDS = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]


def _car_annos(rows) -> np.ndarray:
    return np.array([tuple(r) for r in rows], dtype=_CAR_FIELDS).reshape(1, -1)


def cars_release() -> dict[str, bytes]:
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    train = [
        (10, 20, 110, 90, 1, "00001.jpg"),
        (5, 5, 50, 40, 2, "00002.jpg"),
        (1, 2, 3, 4, 2, "00003.jpg"),
    ]
    test = [(7, 8, 17, 28, 2, "00001.jpg"), (1, 1, 9, 9, 1, "00002.jpg")]
    devkit = {
        "devkit/cars_meta.mat": _mat(class_names=np.array(names, dtype=object).reshape(1, -1)),
        "devkit/cars_train_annos.mat": _mat(annotations=_car_annos(train)),
        "devkit/cars_test_annos.mat": _mat(
            annotations=_car_annos([r[:4] + (0, r[5]) for r in test])
        ),
        "devkit/README.txt": "devkit",
    }
    return {
        "cars_train.tgz": _tgz({f"cars_train/{r[5]}": _jpeg(i) for i, r in enumerate(train)}),
        "cars_test.tgz": _tgz({f"cars_test/{r[5]}": _jpeg(i) for i, r in enumerate(test)}),
        "car_devkit.tgz": _tgz(devkit),
        "cars_test_annos_withlabels.mat": _mat(annotations=_car_annos(test)),
    }


def check_cars(splits: DatasetSplits) -> None:
    assert splits.classes == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert [s.label for s in splits.train] == [0, 1, 1] and [s.label for s in splits.test] == [1, 0]
    assert splits.train[0].meta["bbox"] == [10.0, 20.0, 100.0, 70.0]
    assert splits.test[0].path.endswith("cars_test/00001.jpg")
    assert splits.annotations == ["bbox"]


_AIRCRAFT = [
    ("0034309", "707-320", "Boeing 707", "Boeing", "trainval"),
    ("0034958", "707-320", "Boeing 707", "Boeing", "test"),
    ("0037511", "A300B4", "A300", "Airbus", "trainval"),
    ("1000001", "F/A-18", "F/A-18", "McDonnell Douglas", "trainval"),
    ("1000002", "F/A-18", "F/A-18", "McDonnell Douglas", "test"),
]


def aircraft_release() -> dict[str, bytes]:
    data = "fgvc-aircraft-2013b/data/"
    files: dict[str, bytes | str] = {
        f"{data}images/{r[0]}.jpg": _jpeg(i) for i, r in enumerate(_AIRCRAFT)
    }
    for col, (level, listing) in enumerate(
        [
            ("variant", "variants.txt"),
            ("family", "families.txt"),
            ("manufacturer", "manufacturers.txt"),
        ],
        start=1,
    ):
        files[data + listing] = "".join(dict.fromkeys(r[col] + "\n" for r in _AIRCRAFT))
        for split in ("trainval", "test"):
            files[f"{data}images_{level}_{split}.txt"] = "".join(
                f"{r[0]} {r[col]}\n" for r in _AIRCRAFT if r[4] == split
            )
    train_only = [r for r in _AIRCRAFT if r[4] == "trainval"][:2]
    val_only = [r for r in _AIRCRAFT if r[4] == "trainval"][2:]
    files[f"{data}images_variant_train.txt"] = "".join(f"{r[0]} {r[1]}\n" for r in train_only)
    files[f"{data}images_variant_val.txt"] = "".join(f"{r[0]} {r[1]}\n" for r in val_only)
    files[data + "images_box.txt"] = "".join(
        f"{r[0]} 3 4 {100 + i} 60\n" for i, r in enumerate(_AIRCRAFT)
    )
    return {"fgvc-aircraft-2013b.tar.gz": _tgz(files)}


def check_aircraft(splits: DatasetSplits) -> None:
    assert splits.classes == ["707-320", "A300B4", "F/A-18"]
    assert [s.label for s in splits.train] == [0, 1, 2] and [s.label for s in splits.test] == [0, 2]
    assert splits.train[0].path.endswith("data/images/0034309.jpg")
    assert splits.test[1].meta["bbox"] == [3.0, 4.0, 101.0, 56.0]


_DOGS = [
    ("n02085620-Chihuahua", "n02085620_10074", 1, "train"),
    ("n02085620-Chihuahua", "n02085620_1007", 1, "test"),
    ("n02085782-Japanese_spaniel", "n02085782_1039", 2, "train"),
    ("n02085782-Japanese_spaniel", "n02085782_2", 2, "test"),
    ("n02085936-Maltese_dog", "n02085936_1", 3, "train"),
]


def _dog_xml(name: str, boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    return f"<annotation><size><width>8</width><height>8</height></size>{objects}</annotation>"


def dogs_release() -> dict[str, bytes]:
    images = {f"Images/{d}/{f}.jpg": _jpeg(i) for i, (d, f, _, _) in enumerate(_DOGS)}
    annotations = {
        f"Annotation/{d}/{f}": _dog_xml(
            d.split("-", 1)[1], [(1, 2, 30, 40)] + [(5, 5, 9, 9)] * (i == 0)
        )
        for i, (d, f, _, _) in enumerate(_DOGS)
    }

    def listing(rows):
        return _mat(
            file_list=_cells([f"{d}/{f}.jpg" for d, f, _, _ in rows]),
            annotation_list=_cells([f"{d}/{f}" for d, f, _, _ in rows]),
            labels=np.array([[float(n)] for _, _, n, _ in rows]),
        )

    lists = {
        "file_list.mat": listing(_DOGS),
        "train_list.mat": listing([r for r in _DOGS if r[3] == "train"]),
        "test_list.mat": listing([r for r in _DOGS if r[3] == "test"]),
    }
    return {
        "images.tar": _tgz(images, "w"),
        "annotation.tar": _tgz(annotations, "w"),
        "lists.tar": _tgz(lists, "w"),
    }


def check_dogs(splits: DatasetSplits) -> None:
    assert splits.classes == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    assert [s.label for s in splits.train] == [0, 1, 2] and [s.label for s in splits.test] == [0, 1]
    assert splits.train[0].meta["bbox"] == [1.0, 2.0, 29.0, 38.0]
    assert len(splits.train[0].meta["boxes"]) == 2 and len(splits.test[0].meta["boxes"]) == 1


def flowers_release() -> dict[str, bytes]:
    labels = [1, 1, 2, 2, 3, 3, 1, 2]
    return {
        "102flowers.tgz": _tgz({f"jpg/image_{i:05d}.jpg": _jpeg(i) for i in range(1, 9)}),
        "imagelabels.mat": _mat(labels=np.array([labels], dtype=np.uint8)),
        "setid.mat": _mat(
            trnid=np.array([[1, 3]], dtype=np.uint16),
            valid=np.array([[5, 8]], dtype=np.uint16),
            tstid=np.array([[2, 4, 6, 7]], dtype=np.uint16),
        ),
    }


def check_flowers(splits: DatasetSplits) -> None:
    assert splits.classes == ["001", "002", "003"]
    assert [s.meta["image_id"] for s in splits.train] == [1, 3, 5, 8]
    assert splits.val == []  # trainval trains on the val images
    assert [s.label for s in splits.train] == [0, 1, 2, 1]
    assert [s.label for s in splits.test] == [0, 1, 2, 0]
    assert splits.test[0].path.endswith("jpg/image_00002.jpg")


def _inat_category(cid: int, genus: str, epithet: str, kingdom: str, supercategory: str) -> dict:
    return {
        "id": cid,
        "name": f"{genus} {epithet}",
        "common_name": f"common {cid}",
        "supercategory": supercategory,
        "kingdom": kingdom,
        "phylum": "P",
        "class": "C",
        "order": "O",
        "family": "F",
        "genus": genus,
        "specific_epithet": epithet,
        "image_dir_name": f"{cid:05d}_{kingdom}_P_C_O_F_{genus}_{epithet}",
    }


_INAT_CATS = [
    _inat_category(0, "Ameiurus", "nebulosus", "Animalia", "Ray-finned Fishes"),
    _inat_category(1, "Peltandra", "virginica", "Plantae", "Plants"),
    _inat_category(2, "Ameiurus", "melas", "Animalia", "Ray-finned Fishes"),
]


def _inat_json(split: str, labels: list[int]) -> dict:
    images, annotations = [], []
    for i, cid in enumerate(labels):
        folder = _INAT_CATS[cid]["image_dir_name"]
        images.append(
            {
                "id": i + 100 * (split == "val"),
                "width": 8,
                "height": 8,
                "file_name": f"{split}/{folder}/{i:08d}-uuid.jpg",
                "license": 0,
                "rights_holder": "someone",
                "date": f"2010-07-{10 + i} 20:19:00+00:00",
                "latitude": 43.5 + i,
                "longitude": -71.25,
                "location_uncertainty": 77,
            }
        )
        annotations.append({"id": i, "image_id": images[-1]["id"], "category_id": cid})
    info = {"year": 2021, "version": "2021"}
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": _INAT_CATS,
        "licenses": [],
    }


def _inat_archives(split: str, labels: list[int]) -> dict[str, bytes]:
    data = _inat_json(split, labels)
    return {
        f"{split}.json.tar.gz": _tgz({f"{split}.json": json.dumps(data)}),
        f"{split}.tar.gz": _tgz(
            {img["file_name"]: _jpeg(i) for i, img in enumerate(data["images"])}
        ),
    }


def inat_release() -> dict[str, bytes]:
    return _inat_archives("train_mini", [0, 1, 2, 0, 1]) | _inat_archives("val", [2, 1, 0])


def check_inat(splits: DatasetSplits) -> None:
    assert splits.name == "inat2021"
    assert splits.classes == ["Ameiurus nebulosus", "Peltandra virginica", "Ameiurus melas"]
    assert [s.label for s in splits.train] == [0, 1, 2, 0, 1] and [
        s.label for s in splits.test
    ] == [2, 1, 0]
    meta = splits.train[1].meta
    assert meta["supercategory"] == "Plants" and meta["taxonomy"]["kingdom"] == "Plantae"
    assert meta["taxonomy"]["species"] == "Peltandra virginica"
    assert meta["latitude"] == 44.5 and meta["longitude"] == -71.25
    assert meta["date"].startswith("2010-07-11")
    assert splits.annotations == ["supercategory", "taxonomy", "location", "date"]
    # What metadata fusion declares: the location and the day of the year (from the date).
    offered = numeric_meta_keys(splits.train)
    assert {"latitude", "longitude", "day_of_year"} <= set(offered)
    values, _ = meta_tensors([meta], ["latitude", "longitude", "day_of_year"])
    assert values.tolist() == [[44.5, -71.25, 192.0]]  # 11 July


CASES = {
    "cub200": ("cub200", cub_release, check_cub),
    "nabirds": ("nabirds", nabirds_release, check_nabirds),
    "cars": ("cars", cars_release, check_cars),
    "aircraft": ("aircraft", aircraft_release, check_aircraft),
    "dogs": ("dogs", dogs_release, check_dogs),
    "flowers102": ("flowers102", flowers_release, check_flowers),
    "inat2021_mini": ("inat", inat_release, check_inat),
}


def _prepare(name: str, files: dict[str, bytes], http_server, monkeypatch) -> dl.DownloadSpec:
    """Serve the fabricated files at the official URL paths; record their real digests."""
    spec = dl.DOWNLOADS[name]
    fixed = []
    for f in spec.files:
        data = files[f.filename]
        http_server.put(urllib.parse.urlsplit(f.url).path, data)
        fixed.append(
            dataclasses.replace(
                f,
                sha256=hashlib.sha256(data).hexdigest(),
                md5=hashlib.md5(data).hexdigest(),
                size=len(data),
            )
        )
    spec = dataclasses.replace(spec, files=tuple(fixed))
    monkeypatch.setitem(dl.DOWNLOADS, name, spec)
    return spec


@pytest.mark.parametrize("name", list(CASES))
def test_download_verify_extract_load(name, http_server, tmp_path, monkeypatch):
    source, release, check = CASES[name]
    assert dl.DOWNLOADS[name].source_name == source
    files = release()
    spec = _prepare(name, files, http_server, monkeypatch)
    root = tmp_path / name
    if spec.manual:
        with pytest.raises(DataError) as err:
            dl.download_dataset(name, root, mirror=http_server.url)
        assert spec.files[0].filename in str(err.value) and str(root) in str(err.value)
        root.mkdir()
        for filename, data in files.items():  # the user puts the official files in place
            (root / filename).write_bytes(data)
    dl.download_dataset(name, root, mirror=http_server.url)
    assert dl.is_ready(root)
    if not spec.manual:
        served = {urllib.parse.urlsplit(f.url).path.lstrip("/") for f in spec.files}
        assert {path for path, _ in http_server.requests} == served
    splits = build_source(DataConfig(source=source, root=str(root)))
    check(splits)
    for sample in splits.train + splits.test:
        assert Path(sample.path).is_file(), sample.path
    # A release folder given directly (not its parent) loads the same.
    if name == "cub200":
        again = SOURCES["cub200"](DataConfig(source="cub200", root=str(root / "CUB_200_2011")))
        assert [s.path for s in again.train] == [s.path for s in splits.train]


def test_manual_dataset_with_corrupt_file_is_refused(tmp_path, monkeypatch):
    files = cars_release()
    spec = dl.DOWNLOADS["cars"]
    root = tmp_path / "cars"
    root.mkdir()
    for filename, data in files.items():
        (root / filename).write_bytes(data)
    # The real published checksums do not match the fabricated files.
    with pytest.raises(DataError, match="cars_train.tgz: size mismatch: expected 979269282"):
        dl.download_dataset("cars", root)
    assert not dl.is_ready(root) and spec.manual


def _release_dir(tmp_path: Path, archives: dict[str, bytes]) -> Path:
    root = tmp_path / "release"
    root.mkdir()
    for name, data in archives.items():
        if name.endswith((".tgz", ".tar.gz", ".tar")):
            archive = root / name
            archive.write_bytes(data)
            dl.safe_extract(archive, root)
            archive.unlink()
        else:
            (root / name).write_bytes(data)
    return root


def test_aircraft_levels_and_train_split(tmp_path):
    root = str(_release_dir(tmp_path, aircraft_release()))
    family = SOURCES["aircraft"](DataConfig(source="aircraft", root=root, level="family"))
    assert family.classes == ["Boeing 707", "A300", "F/A-18"]
    maker = SOURCES["aircraft"](DataConfig(source="aircraft", root=root, level="manufacturer"))
    assert maker.classes == ["Boeing", "Airbus", "McDonnell Douglas"]
    assert [s.label for s in maker.test] == [0, 2]
    cfg = DataConfig(source="aircraft", root=root)
    assert SOURCES["aircraft"](cfg).val == []  # the val list is inside trainval
    cfg.train_split = "train"  # the key the engine's config adds
    train_only = SOURCES["aircraft"](cfg)
    assert len(train_only.train) == 2
    assert [s.label for s in train_only.val] == [2]  # the official val list validates
    with pytest.raises(
        DataError, match="data.level: aircraft offers variant, family, manufacturer"
    ):
        SOURCES["aircraft"](DataConfig(source="aircraft", root=root, level="model"))


def test_inat_levels_and_train_split(tmp_path):
    full = _inat_archives("train", [0, 0, 1]) | inat_release()
    root = str(_release_dir(tmp_path, full))
    default = SOURCES["inat"](DataConfig(source="inat", root=root))
    assert len(default.train) == 3  # the full train set when both are present
    cfg = DataConfig(source="inat", root=root, level="genus")
    cfg.train_split = "train_mini"
    genus = SOURCES["inat"](cfg)
    assert genus.classes == ["Ameiurus", "Peltandra"] and len(genus.train) == 5
    assert [s.label for s in genus.test] == [0, 1, 0]
    kingdom = SOURCES["inat"](DataConfig(source="inat", root=root, level="kingdom"))
    assert kingdom.classes == ["Animalia", "Plantae"]
    with pytest.raises(DataError, match="data.level: inat offers species"):
        SOURCES["inat"](DataConfig(source="inat", root=root, level="subspecies"))


def test_inat_2018_taxonomy_from_categories_json_and_2017(tmp_path):
    root = tmp_path / "i18"
    root.mkdir()
    images = [
        {"id": 1, "file_name": "train_val2018/Plantae/7477/a.jpg"},
        {"id": 2, "file_name": "train_val2018/Aves/2820/b.jpg"},
    ]
    cats = [
        {"supercategory": "Plantae", "id": 7477, "name": "7477"},
        {"supercategory": "Aves", "id": 2820, "name": "2820"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7477},
        {"id": 2, "image_id": 2, "category_id": 2820},
    ]
    data = {"images": images, "annotations": anns, "categories": cats}
    for name in ("train2018.json", "val2018.json"):
        (root / name).write_text(json.dumps(data))
    full = [
        {
            "id": 7477,
            "name": "Platanus occidentalis",
            "supercategory": "Plantae",
            "kingdom": "Plantae",
            "phylum": "Magnoliophyta",
            "class": "Magnoliopsida",
            "order": "Proteales",
            "family": "Platanaceae",
            "genus": "Platanus",
        },
        {
            "id": 2820,
            "name": "Anas platyrhynchos",
            "supercategory": "Aves",
            "kingdom": "Animalia",
            "phylum": "Chordata",
            "class": "Aves",
            "order": "Anseriformes",
            "family": "Anatidae",
            "genus": "Anas",
        },
    ]
    (root / "categories.json").write_text(json.dumps(full))
    splits = SOURCES["inat"](DataConfig(source="inat", root=str(root)))
    assert splits.name == "inat2018" and splits.classes == [
        "Anas platyrhynchos",
        "Platanus occidentalis",
    ]
    assert [s.label for s in splits.train] == [1, 0]
    assert splits.train[0].meta["taxonomy"]["family"] == "Platanaceae"
    (root / "categories.json").unlink()
    with pytest.raises(DataError, match="no 'family' field"):
        SOURCES["inat"](DataConfig(source="inat", root=str(root), level="family"))

    old = tmp_path / "i17"
    old.mkdir()
    data17 = {
        "images": [{"id": 5, "file_name": "train_val_images/Aves/Corvus corax/x.jpg"}],
        "annotations": [{"id": 5, "image_id": 5, "category_id": 0}],
        "categories": [{"id": 0, "name": "Corvus corax", "supercategory": "Aves"}],
    }
    for name in ("train2017.json", "val2017.json"):
        (old / name).write_text(json.dumps(data17))
    s17 = SOURCES["inat"](DataConfig(source="inat", root=str(old), level="supercategory"))
    assert (
        s17.name == "inat2017" and s17.classes == ["Aves"] and s17.annotations == ["supercategory"]
    )


def test_missing_release_files_are_named(tmp_path):
    root = _release_dir(tmp_path, cub_release())
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt: missing file"):
        SOURCES["cub200"](DataConfig(source="cub200", root=str(root)))
    with pytest.raises(DataError, match="not a dogs release.*lookcloser data download dogs"):
        SOURCES["dogs"](DataConfig(source="dogs", root=str(root)))
    with pytest.raises(DataError, match="data.level: cub200 has a single label level"):
        SOURCES["cub200"](DataConfig(source="cub200", root=str(root), level="family"))


def test_bad_annotation_value_names_file(tmp_path):
    root = _release_dir(tmp_path, cub_release())
    (root / "CUB_200_2011" / "bounding_boxes.txt").write_text("1 a b c d\n")
    with pytest.raises(
        DataError, match=r"bounding_boxes.txt: image 1 box: expected a number, got 'a'"
    ):
        SOURCES["cub200"](DataConfig(source="cub200", root=str(root)))


def test_incomplete_download_is_refused_by_the_loader(tmp_path):
    root = _release_dir(tmp_path, flowers_release())
    (root / dl.INCOMPLETE_MARKER).touch()
    with pytest.raises(DataError, match="interrupted"):
        SOURCES["flowers102"](DataConfig(source="flowers102", root=str(root)))


def test_dataset_info_and_format():
    samples = [Sample(f"{i}.jpg", label) for i, label in enumerate([0, 0, 0, 1, 2, 2])]
    splits = DatasetSplits(["a", "b", "c", "d"], samples, samples[:2], "toy", ["bbox"])
    info = dataset_info(splits)
    assert info["num_classes"] == 4
    assert info["splits"]["train"] == {
        "images": 6,
        "per_class": {"min": 0, "median": 1.5, "max": 3},
        "empty": 1,
    }
    assert info["splits"]["test"]["per_class"] == {"min": 0, "median": 0.0, "max": 2}
    text = format_info(info)
    assert "classes: 4 (a, b, c, d)" in text
    assert "train: 6 images; per class min 0, median 1.5, max 3; 1 class(es) without images" in text
    assert "annotations: bbox" in text


def test_flowers_train_split_validates_on_the_official_val_ids(tmp_path):
    root = _release_dir(tmp_path, flowers_release())
    cfg = DataConfig(source="flowers102", root=str(root))
    cfg.train_split = "train"
    splits = SOURCES["flowers102"](cfg)
    assert [s.meta["image_id"] for s in splits.train] == [1, 3]
    assert [s.meta["image_id"] for s in splits.val] == [5, 8]
