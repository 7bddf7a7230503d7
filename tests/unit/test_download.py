"""Downloads: checksums, resume, safe extraction, and the all-or-nothing dataset folder."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path

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
@pytest.fixture(params=["data-filter", "no-filter"])
def tar_filter(request, monkeypatch) -> bool:
    """Extract with tarfile's `data` filter, and without one as on Python 3.11.0-3.11.3."""
    if request.param == "data-filter":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip("this Python's tarfile has no extraction filters")
        return True
    # safe_extract looks up tarfile.data_filter at each call (dl._data_filter). Python >= 3.14
    # filters by default even so; an identity default filter turns that off too.
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.setattr(
        tarfile.TarFile,
        "extraction_filter",
        staticmethod(lambda member, path: member),
        raising=False,
    )
    return False


def _spec_tar(spec: list[tuple], outside: Path, mode: str = "w") -> bytes:
    """A tar from rows (kind, name, data or link[, mode]): kind f/d/s/h/c/p file, folder,
    symlink, hard link, character device, FIFO; OUT in a name or link stands for `outside`."""
    members = []
    for kind, name, *rest in spec:
        name = name.replace("OUT", str(outside))
        arg = rest[0].replace("OUT", str(outside)) if rest and isinstance(rest[0], str) else None
        if kind == "f":
            info, data = _file(name, rest[0] if rest else b"x")
            info.mode = rest[1] if len(rest) > 1 else info.mode
            members.append((info, data))
        elif kind in ("s", "h"):
            members.append(_link(name, arg, tarfile.SYMTYPE if kind == "s" else tarfile.LNKTYPE))
        else:
            info = tarfile.TarInfo(name)
            info.type = {"d": tarfile.DIRTYPE, "c": tarfile.CHRTYPE, "p": tarfile.FIFOTYPE}[kind]
            members.append((info, None))
    return _tar(members, mode=mode)


def _snapshot(root: Path) -> dict[str, object]:
    """Everything under `root`: each file's bytes, each symlink's text, each folder."""
    state: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):  # does not follow symlinks
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("symlink", os.readlink(path))
            elif path.is_dir():
                state[key] = "folder"
            elif path.is_file():
                state[key] = path.read_bytes()
            else:
                state[key] = "special"
    return state


# Each row: the archive, symlinks already in the target, the member refused, why. Without
# our checks, each archive (without the filter) writes outside the target or leaves a symlink
# that leads outside. OUT is tmp_path/outside, which holds keep.txt; the target's parent is
# tmp_path.
_REFUSED = {
    "symlink-chain": (
        [("s", "a", "."), ("s", "b", "a/.."), ("s", "c", "b/outside"), ("f", "c/keep.txt", b"!")],
        {},
        "b",
        "resolves outside the target folder through symlink 'a' -> '.'",
    ),
    "symlink-chain-closed-later": (
        [("s", "s", "p/.."), ("s", "p", "."), ("f", "s/outside/keep.txt", b"pwned")],
        {},
        "s/outside/keep.txt",
        "resolves outside the target folder through symlink 'p' -> '.'",
    ),
    "symlink-left-leading-outside": (
        [("s", "s", "p/.."), ("s", "p", ".")],
        {},
        "s",
        "with later members resolves outside the target folder",
    ),
    "symlink-up": ([("s", "data/link", "../../outside")], {}, "data/link", "resolves outside"),
    "symlink-absolute": (
        [("s", "link", "OUT"), ("f", "link/keep.txt", b"pwned")],
        {},
        "link",
        "absolute path",
    ),
    "symlink-loop": (
        [("s", "a", "b"), ("s", "b", "a"), ("f", "a/evil.txt")],
        {},
        "a/evil.txt",
        "more than 40 symlinks",
    ),
    "hardlink-up": (
        [("h", "hard", "../outside/keep.txt"), ("f", "hard", b"pwned")],
        {},
        "hard",
        "resolves outside",
    ),
    "hardlink-absolute": (
        [("h", "hard", "OUT/keep.txt"), ("f", "hard", b"pwned")],
        {},
        "hard",
        "absolute path",
    ),
    "hardlink-to-escaping-symlink": (
        [
            ("s", "s", "p/../outside/keep.txt"),
            ("s", "p", "."),
            ("h", "h", "s"),
            ("f", "h", b"pwned"),
        ],
        {},
        "h",
        "is a hard link to 's', which resolves outside the target folder through symlink 'p'",
    ),
    # tarfile would copy the symlink member 'sub/s' to 'h', one folder up: h -> ../outside.
    "hardlink-to-dangling-symlink": (
        [("d", "sub"), ("s", "sub/s", "../outside"), ("h", "h", "sub/s"), ("f", "h/keep.txt")],
        {},
        "h",
        "not a file extracted before it",
    ),
    "hardlink-forward": (
        [("h", "h", "later.txt"), ("f", "later.txt")],
        {},
        "h",
        "not a file extracted before it",
    ),
    "under-symlinked-folder-on-disk": (
        [("f", "d/keep.txt", b"pwned")],
        {"d": "../outside"},
        "d/keep.txt",
        "through symlink 'd' -> '../outside'",
    ),
    "hardlink-to-symlink-on-disk": (
        [("h", "h", "evil"), ("f", "h", b"pwned")],
        {"evil": "OUT/keep.txt"},
        "h",
        "follows the absolute symlink 'evil'",
    ),
    "absolute-member": ([("f", "OUT/keep.txt", b"pwned")], {}, "OUT/keep.txt", "absolute"),
    "dotdot": ([("f", "../outside/keep.txt", b"pwned")], {}, "../outside/keep.txt", "'..'"),
    "nested-dotdot": ([("f", "data/../../evil.txt")], {}, "data/../../evil.txt", "'..'"),
    "backslash-dotdot": ([("f", "..\\evil.txt")], {}, "..\\evil.txt", "'..'"),
    "backslash": ([("f", "data\\evil.txt")], {}, "data\\evil.txt", "backslash"),
    "drive": ([("f", "C:evil.txt")], {}, "C:evil.txt", "drive"),
    "device": ([("c", "dev/null")], {}, "dev/null", "device file or FIFO"),
    "fifo": ([("p", "pipe")], {}, "pipe", "device file or FIFO"),
}


@pytest.mark.parametrize("case", list(_REFUSED), ids=list(_REFUSED))
def test_safe_extract_refuses_escaping_members(tmp_path, tar_filter, case):
    spec, on_disk, refused, why = _REFUSED[case]
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"keep")
    target.mkdir()
    for name, link in on_disk.items():
        (target / name).symlink_to(link.replace("OUT", str(outside)))
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_spec_tar([("f", "data/ok.txt"), *spec], outside, mode="w:gz"))
    before = _snapshot(tmp_path)
    with pytest.raises(DataError) as err:
        dl.safe_extract(archive, target)
    message = str(err.value)
    # Our own check names the member and the reason; tarfile's filter never had to step in.
    assert repr(refused.replace("OUT", str(outside))) in message and why in message, message
    assert str(archive) in message and "data filter" not in message and "corrupt" not in message
    # Nothing was written anywhere: not outside the target, not in it.
    assert _snapshot(tmp_path) == before


def test_safe_extract_keeps_links_inside_and_reports_top_level(tmp_path, tar_filter):
    spec = [
        ("d", "pkg"),
        ("f", "pkg/a.txt", b"A"),
        ("s", "pkg/b.txt", "a.txt"),
        ("s", "latest", "pkg"),
        ("f", "latest/c.txt", b"C"),  # through a symlink that stays inside
        ("d", "pkg/sub"),
        ("s", "pkg/sub/up", ".."),
        ("f", "pkg/sub/up/d.txt", b"D"),
        ("h", "hard", "latest/a.txt"),
        ("h", "pkg/sub/same", "pkg/b.txt"),  # a hard link through a symlink to a file
        ("f", "pkg/old.txt", b"old"),
        ("h", "pkg/old.txt", "pkg/a.txt"),  # a hard link replaces what is at its name
        ("f", "README", b"r", 0o666),
    ]
    archive = tmp_path / "good.tar.bz2"
    archive.write_bytes(_spec_tar(spec, tmp_path, mode="w:bz2"))
    target = tmp_path / "t"
    assert dl.safe_extract(archive, target) == ["README", "hard", "latest", "pkg"]
    pkg = target / "pkg"
    assert os.readlink(pkg / "b.txt") == "a.txt" and os.readlink(target / "latest") == "pkg"
    assert (pkg / "b.txt").read_bytes() == b"A"
    assert (pkg / "c.txt").read_bytes() == b"C" and (pkg / "d.txt").read_bytes() == b"D"
    for name in ("hard", "pkg/sub/same", "pkg/old.txt"):
        assert not (target / name).is_symlink() and os.path.samefile(target / name, pkg / "a.txt")
    # The data filter drops group/other write bits; without it the archive's mode is kept.
    assert stat.S_IMODE((target / "README").stat().st_mode) == (0o644 if tar_filter else 0o666)
    # A second archive into the same folder may use the first one's links and files.
    second = tmp_path / "second.tar"
    second.write_bytes(_spec_tar([("f", "latest/e.txt", b"E"), ("h", "h2", "README")], tmp_path))
    assert dl.safe_extract(second, target) == ["h2", "latest"]
    assert (pkg / "e.txt").read_bytes() == b"E" and (target / "h2").read_bytes() == b"r"


def test_filter_refusal_still_names_the_member(tmp_path, monkeypatch):
    if not hasattr(tarfile, "FilterError"):
        pytest.skip("this Python's tarfile has no extraction filters")

    def refuse_all(member, path):
        raise tarfile.AbsolutePathError(member)

    monkeypatch.setattr(dl, "_data_filter", lambda: refuse_all)
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar([_file("data/ok.txt")], mode="w"))
    with pytest.raises(DataError, match=r"member 'data/ok.txt' was refused by tarfile's data"):
        dl.safe_extract(archive, tmp_path / "t")


def test_safe_extract_zip(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("train2017.json", "{}")
    assert dl.safe_extract(good, tmp_path / "g") == ["train2017.json"]


@pytest.mark.parametrize(
    "name",
    [
        "../evil.json",
        "a/../../evil.json",
        "/tmp/lookcloser-evil.json",
        "C:/evil.json",
        "C:evil.json",
        "..\\evil.json",
        "\\\\server\\share\\evil.json",
        "dir\\evil.json",
        "link",
    ],
)
def test_safe_extract_zip_refuses_escaping_members(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("first.json", "{}")
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../outside" if name == "link" else "{}")
    target = tmp_path / "target"
    with pytest.raises(DataError, match=re.escape(repr(name))):
        dl.safe_extract(archive, target)
    # Every member is checked first: not even the good one was written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "target"]
    assert list(target.iterdir()) == []


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
