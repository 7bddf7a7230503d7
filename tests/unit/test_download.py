"""Downloads: checksums, resume, safe extraction, and the all-or-nothing dataset folder."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import zipfile

import pytest

from lookcloser.data import download as dl
from lookcloser.errors import DataError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919) % 251 for i in range(n))


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


# ---- download_file --------------------------------------------------------------------------
def test_download_file_verifies_sha256_and_md5(http_server, tmp_path):
    data = _payload()
    url = http_server.put("files/blob.bin", data)
    dest = tmp_path / "out" / "blob.bin"
    got = dl.download_file(url, dest, sha256=_sha(data), md5=hashlib.md5(data).hexdigest())
    assert got == dest and dest.read_bytes() == data
    assert not dest.with_name("blob.bin.part").exists()
    # A verified file is not fetched again.
    n = len(http_server.requests)
    dl.download_file(url, dest, sha256=_sha(data))
    assert len(http_server.requests) == n


def test_checksum_mismatch_names_file_and_leaves_nothing(http_server, tmp_path):
    data = _payload(1000)
    url = http_server.put("a/archive.tgz", data)
    dest = tmp_path / "archive.tgz"
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        dl.download_file(url, dest, sha256=wrong)
    message = str(err.value)
    assert "archive.tgz" in message and wrong in message and _sha(data) in message
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_md5_mismatch_is_reported(http_server, tmp_path):
    url = http_server.put("m.bin", b"hello")
    with pytest.raises(DataError, match="MD5 mismatch"):
        dl.download_file(url, tmp_path / "m.bin", md5="f" * 32)
    assert not (tmp_path / "m.bin.part").exists()


def test_interrupted_download_resumes_with_range(http_server, tmp_path):
    data = _payload()
    url = http_server.put("big.tar", data)
    dest = tmp_path / "big.tar"
    http_server.cut_after["big.tar"] = 100_000
    with pytest.raises(DataError, match="interrupted"):
        dl.download_file(url, dest, sha256=_sha(data), retries=0)
    part = tmp_path / "big.tar.part"
    assert part.stat().st_size == 100_000 and not dest.exists()
    dl.download_file(url, dest, sha256=_sha(data), retries=0)
    assert dest.read_bytes() == data
    assert http_server.requests[-1] == ("big.tar", "bytes=100000-")


def test_dropped_connection_is_retried_within_one_call(http_server, tmp_path):
    data = _payload()
    url = http_server.put("r.bin", data)
    http_server.cut_after["r.bin"] = 50_000
    dl.download_file(url, tmp_path / "r.bin", sha256=_sha(data), retries=1)
    assert (tmp_path / "r.bin").read_bytes() == data
    assert [r for _, r in http_server.requests] == [None, "bytes=50000-"]


def test_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    data = _payload(200_000)
    url = http_server.put("n.bin", data)
    (tmp_path / "n.bin.part").write_bytes(data[:1000])
    http_server.ignore_range = True
    dl.download_file(url, tmp_path / "n.bin", sha256=_sha(data))
    assert (tmp_path / "n.bin").read_bytes() == data


def test_http_404_is_a_clear_error(http_server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download_file(f"{http_server.url}/missing.tgz", tmp_path / "missing.tgz")


# ---- safe_extract ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member",
    [
        _file("../evil.txt"),
        _file("data/../../evil.txt"),
        _file("/tmp/lookcloser-evil.txt"),
        _link("data/link", "../../outside"),
        _link("link", "/etc/passwd"),
        _link("hard", "../outside.txt", tarfile.LNKTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-up", "symlink-absolute", "hardlink-up"],
)
def test_safe_extract_refuses_escaping_members(tmp_path, member):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_tar([_file("data/ok.txt"), member]))
    target = tmp_path / "target" / "inner"
    with pytest.raises(DataError) as err:
        dl.safe_extract(archive, target)
    assert repr(member[0].name) in str(err.value)
    outside = [p for p in tmp_path.rglob("*") if "evil" in p.name or p.name == "outside"]
    assert outside == []


def test_safe_extract_refuses_device_files(tmp_path):
    device = tarfile.TarInfo("dev/null")
    device.type = tarfile.CHRTYPE
    archive = tmp_path / "dev.tar"
    archive.write_bytes(_tar([(device, None)], mode="w"))
    with pytest.raises(DataError, match="device"):
        dl.safe_extract(archive, tmp_path / "t")


def test_safe_extract_keeps_links_inside_and_reports_top_level(tmp_path):
    archive = tmp_path / "good.tar.bz2"
    members = [_file("pkg/a.txt", b"A"), _link("pkg/b.txt", "a.txt"), _file("README", b"r")]
    archive.write_bytes(_tar(members, mode="w:bz2"))
    target = tmp_path / "t"
    assert dl.safe_extract(archive, target) == ["README", "pkg"]
    assert (target / "pkg" / "b.txt").read_bytes() == b"A"


def test_safe_extract_zip(tmp_path):
    good, bad = tmp_path / "good.zip", tmp_path / "bad.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("train2017.json", "{}")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.json", "{}")
    assert dl.safe_extract(good, tmp_path / "g") == ["train2017.json"]
    with pytest.raises(DataError, match=re.escape("'../evil.json'")):
        dl.safe_extract(bad, tmp_path / "b")
    assert not (tmp_path / "evil.json").exists()


def test_safe_extract_rejects_non_archives(tmp_path):
    path = tmp_path / "x.tgz"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="not a tar or zip"):
        dl.safe_extract(path, tmp_path / "t")


# ---- download_dataset -----------------------------------------------------------------------
def _fake_spec(http_server, monkeypatch, archive: bytes, **changes) -> dl.DownloadSpec:
    http_server.put("vgg/toy/toy.tar.gz", archive)
    file = dl.ArchiveFile("https://example.org/vgg/toy/toy.tar.gz", "toy.tar.gz", _sha(archive))
    spec = dl.DownloadSpec(
        name="toy",
        title="Toy set",
        homepage="https://example.org",
        terms="none",
        files=(file,),
        expect=("toy/labels.txt",),
    )
    spec = dataclasses.replace(spec, **changes)
    monkeypatch.setitem(dl.DOWNLOADS, "toy", spec)
    return spec


def test_download_dataset_extracts_and_marks_ready_via_env_mirror(
    http_server, tmp_path, monkeypatch
):
    archive = _tar([_file("toy/labels.txt", b"1 a\n"), _file("toy/img/1.jpg", _payload(10))])
    _fake_spec(http_server, monkeypatch, archive)
    monkeypatch.setenv(dl.MIRROR_ENV, http_server.url)
    root = dl.download_dataset("toy", tmp_path / "toy-data")
    assert (root / "toy" / "labels.txt").read_text() == "1 a\n"
    assert dl.is_ready(root)
    assert sorted(p.name for p in root.iterdir()) == [dl.READY_MARKER, "toy"]
    assert not any(p.name.endswith("staging") for p in tmp_path.iterdir())
    # Ready: a second call does nothing.
    n = len(http_server.requests)
    dl.download_dataset("toy", root)
    assert len(http_server.requests) == n


def test_download_dataset_checksum_mismatch_leaves_nothing(http_server, tmp_path, monkeypatch):
    archive = _tar([_file("toy/labels.txt")])
    spec = _fake_spec(http_server, monkeypatch, archive)
    bad = dataclasses.replace(spec.files[0], sha256="1" * 64)
    monkeypatch.setitem(dl.DOWNLOADS, "toy", dataclasses.replace(spec, files=(bad,)))
    with pytest.raises(DataError, match="toy.tar.gz.*SHA-256 mismatch: expected 1{64}"):
        dl.download_dataset("toy", tmp_path / "data", mirror=http_server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]


def test_interrupted_dataset_download_resumes(http_server, tmp_path, monkeypatch):
    archive = _tar([_file("toy/labels.txt"), _file("toy/big.bin", _payload())], mode="w")
    _fake_spec(http_server, monkeypatch, archive)
    http_server.cut_after["vgg/toy/toy.tar.gz"] = 120_000
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    root = tmp_path / "data"
    original = dl.download_file

    def no_retry(*args, **kwargs):
        return original(*args, **{**kwargs, "retries": 0})

    monkeypatch.setattr(dl, "download_file", no_retry)
    with pytest.raises(DataError, match="interrupted"):
        dl.download_dataset("toy", root, mirror=http_server.url)
    assert not dl.is_ready(root) and not (root / "toy").exists()
    assert (root / dl.DOWNLOADS_DIR / "toy.tar.gz.part").stat().st_size == 120_000
    dl.download_dataset("toy", root, mirror=http_server.url)
    assert dl.is_ready(root) and (root / "toy" / "big.bin").read_bytes() == _payload()
    assert http_server.requests[-1][1] == "bytes=120000-"
    assert not (root / dl.DOWNLOADS_DIR).exists()


def test_download_dataset_rejects_wrong_layout(http_server, tmp_path, monkeypatch):
    archive = _tar([_file("other/readme.txt")])
    _fake_spec(http_server, monkeypatch, archive)
    with pytest.raises(DataError, match="expected toy/labels.txt"):
        dl.download_dataset("toy", tmp_path / "data", mirror=http_server.url)
    assert not (tmp_path / "data" / dl.READY_MARKER).exists()
    assert not (tmp_path / "data" / "other").exists()


def test_manual_dataset_says_what_to_fetch_and_where(tmp_path):
    root = tmp_path / "nab"
    with pytest.raises(DataError) as err:
        dl.download_dataset("nabirds", root)
    message = str(err.value)
    assert "nabirds.tar.gz" in message and str(root) in message
    assert "https://dl.allaboutbirds.org/nabirds" in message
    assert not root.exists()


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError, match="cub200"):
        dl.dataset_spec("imagenet")


def test_mirrored_url_keeps_path():
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat"
    assert (
        dl.mirrored_url(url, "http://127.0.0.1:9/")
        == "http://127.0.0.1:9/~vgg/data/flowers/102/setid.mat"
    )
    assert dl.mirrored_url(url, None) == url


def test_registered_specs_are_well_formed():
    expected = {"cub200", "nabirds", "cars", "aircraft", "dogs", "flowers102"}
    assert expected | {"inat2017", "inat2018", "inat2021", "inat2021_mini"} == set(dl.DOWNLOADS)
    for spec in dl.DOWNLOADS.values():
        assert spec.files and spec.expect and spec.terms and spec.homepage.startswith("http")
        for f in spec.files:
            assert f.url.startswith(("https://", "http://")) and f.filename
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), f
            assert f.md5 is None or re.fullmatch(r"[0-9a-f]{32}", f.md5), f
            assert f.sha256 or f.md5, f"{f.filename}: no published checksum recorded"
            assert f.checksum_source, f.filename
    assert all(row["verified"] for row in dl.describe_downloads())
