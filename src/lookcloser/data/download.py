"""Fetch official dataset archives: resumable HTTP, checksum verification, safe extraction.

`download_dataset(name, root)` downloads every archive of a dataset, verifies it, extracts it
into a temporary sibling folder, moves the result into `root` and writes `.lookcloser-ready`
last, so an interrupted run never leaves a folder that looks complete. Datasets whose terms
need a manual step raise a DataError that says exactly what to fetch and where to put it;
once the files are there, the same call verifies and extracts them.

Checksums are the published ones (see each entry's `checksum_source`); none is invented.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from lookcloser.errors import DataError

READY_MARKER = ".lookcloser-ready"
INCOMPLETE_MARKER = ".lookcloser-incomplete"
DOWNLOADS_DIR = ".lookcloser-downloads"
MIRROR_ENV = "LOOKCLOSER_MIRROR"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_MIN_RATE = 256 * 1024  # bytes/s below which the default deadline stops a download

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class ArchiveFile:
    """One file of a dataset release: where it lives, its published checksums, what to do."""

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    # Archives are extracted; anything else (a .mat label file) is copied as it is.
    extract: bool = True
    # Where the checksum was published, so a reader can check it.
    checksum_source: str = ""


@dataclass(frozen=True)
class DownloadSpec:
    """How to obtain one dataset: its files, where they come from, and its terms."""

    name: str
    title: str
    homepage: str
    terms: str
    files: tuple[ArchiveFile, ...]
    # Paths (relative to the dataset folder) that must exist once everything is extracted.
    expect: tuple[str, ...]
    # Set when the files cannot be fetched automatically: what the user must do first.
    manual: str | None = None
    # The data source that loads the prepared folder (`data.source`); the name by default.
    source: str = ""

    @property
    def source_name(self) -> str:
        """The `data.source` that reads this dataset's folder."""
        return self.source or self.name


_TFDS = "tensorflow/datasets url_checksums (sha256 and size)"
_TV = "torchvision.datasets (md5)"
_OX = "https://www.robots.ox.ac.uk/~vgg/data"
_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com"

DOWNLOADS: dict[str, DownloadSpec] = {}


def _register(spec: DownloadSpec) -> None:
    DOWNLOADS[spec.name] = spec


_register(
    DownloadSpec(
        name="cub200",
        title="Caltech-UCSD Birds-200-2011",
        homepage="https://data.caltech.edu/records/65de6-vp158",
        terms="Flickr photos, copyright of their owners; see the homepage for the terms of use.",
        files=(
            ArchiveFile(
                "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                "CUB_200_2011.tgz",
                sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
                md5="97eceeb196236b17998738112f37df78",
                size=1_150_585_339,
                checksum_source="torchvision prototype cub200 (sha256); widely used Cub2011 loaders (md5)",
            ),
        ),
        expect=("CUB_200_2011/images.txt", "CUB_200_2011/train_test_split.txt"),
    )
)

_register(
    DownloadSpec(
        name="nabirds",
        title="NABirds (Cornell Lab of Ornithology)",
        homepage="https://dl.allaboutbirds.org/nabirds",
        terms="Cornell Lab terms of use: non-commercial research; you must accept them to download.",
        files=(
            ArchiveFile(
                "https://dl.allaboutbirds.org/nabirds",
                "nabirds.tar.gz",
                md5="df21a9e4db349a14e2b08adfd45873bd",
                checksum_source="md5 used by community NABirds loaders; no official checksum published",
            ),
        ),
        expect=("nabirds/images.txt", "nabirds/hierarchy.txt"),
        manual=(
            "NABirds needs you to accept the Cornell Lab terms of use: open "
            "https://dl.allaboutbirds.org/nabirds, fill in the form, download nabirds.tar.gz "
            "and put it at {root}/nabirds.tar.gz; then run this command again to verify and "
            "extract it."
        ),
    )
)

_register(
    DownloadSpec(
        name="cars",
        title="Stanford Cars (196 classes)",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        terms="Web images, copyright of their owners; see the homepage for the terms of use.",
        files=(
            ArchiveFile(
                "https://ai.stanford.edu/~jkrause/car196/cars_train.tgz",
                "cars_train.tgz",
                sha256="512b227b30e2f0a8aab9e09485786ab4479582073a144998da74d64b801fd288",
                size=979_269_282,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                "https://ai.stanford.edu/~jkrause/car196/cars_test.tgz",
                "cars_test.tgz",
                sha256="bffea656d6f425cba3c91c6d83336e4c5f86c6cffd8975b0f375d3a10da8e243",
                size=977_350_468,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                "https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz",
                "car_devkit.tgz",
                sha256="b97deb463af7d58b6bfaa18b2a4de9829f0f79e8ce663dfa9261bf7810e9accd",
                size=330_960,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                "https://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat",
                "cars_test_annos_withlabels.mat",
                sha256="790f75be8ea34eeded134cc559332baf23e30e91367e9ddca97d26ed9b895f05",
                size=185_758,
                extract=False,
                checksum_source=_TFDS,
            ),
        ),
        expect=("devkit/cars_meta.mat", "cars_train", "cars_test"),
        manual=(
            "Stanford Cars is no longer served from its original address "
            "(ai.stanford.edu/~jkrause/car196). Obtain the four original release files "
            "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat "
            "(from a copy you trust) and put them in {root}/; then run this command again to "
            "verify their SHA-256 and extract them."
        ),
    )
)

_register(
    DownloadSpec(
        name="aircraft",
        title="FGVC-Aircraft 2013b",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        terms="airliners.net photos; for non-commercial research purposes only (see homepage).",
        files=(
            ArchiveFile(
                f"{_OX}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                "fgvc-aircraft-2013b.tar.gz",
                sha256="d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
                md5="d4acdd33327262359767eeaa97a4f732",
                size=2_770_575_360,
                checksum_source=f"{_TFDS}; md5 from mlverse/torchvision and others",
            ),
        ),
        expect=("fgvc-aircraft-2013b/data/images_variant_test.txt",),
    )
)

_register(
    DownloadSpec(
        name="dogs",
        title="Stanford Dogs (120 breeds)",
        homepage="http://vision.stanford.edu/aditya86/ImageNetDogs/",
        terms="Images and boxes from ImageNet; ImageNet terms of access apply.",
        files=(
            ArchiveFile(
                "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
                "images.tar",
                sha256="a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
                md5="1bb1f2a596ae7057f99d7d75860002ef",
                size=793_579_520,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                "http://vision.stanford.edu/aditya86/ImageNetDogs/annotation.tar",
                "annotation.tar",
                sha256="662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd",
                md5="4298cc0031f6bc6e74612ac83b5988e2",
                size=21_852_160,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
                "lists.tar",
                sha256="34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",
                md5="edbb9f16854ec66506b5f09b583e0656",
                size=481_280,
                checksum_source=_TFDS,
            ),
        ),
        expect=("train_list.mat", "test_list.mat", "Images", "Annotation"),
    )
)

_register(
    DownloadSpec(
        name="flowers102",
        title="Oxford Flowers-102",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        terms="Web images; the page publishes no license; see the homepage.",
        files=(
            ArchiveFile(
                f"{_OX}/flowers/102/102flowers.tgz",
                "102flowers.tgz",
                sha256="2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246",
                md5="52808999861908f626f3c1f4e79d11fa",
                size=344_862_509,
                checksum_source=f"{_TFDS}; {_TV}",
            ),
            ArchiveFile(
                f"{_OX}/flowers/102/imagelabels.mat",
                "imagelabels.mat",
                sha256="4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d",
                md5="e0620be6f572b9609742df49c70aed4d",
                size=502,
                extract=False,
                checksum_source=f"{_TFDS}; {_TV}",
            ),
            ArchiveFile(
                f"{_OX}/flowers/102/setid.mat",
                "setid.mat",
                sha256="46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd",
                md5="a5357ecc9cb78c4bef273ce3793fc85c",
                size=14_989,
                extract=False,
                checksum_source=f"{_TFDS}; {_TV}",
            ),
        ),
        expect=("jpg", "imagelabels.mat", "setid.mat"),
    )
)

_INAT_TERMS = (
    "Images from iNaturalist observers under their own licenses (mostly CC BY-NC); "
    "see github.com/visipedia/inat_comp for the competition terms."
)
_INAT_2021 = {
    "train.tar.gz": (
        "5a9093b2174ac08538435d79f3c6fa4b5d40c72a49b7d9a7b24b5e48f9e4f5d9",
        "e0526d53c7f7b2e3167b2b43bb2690ed",
        239_909_164_970,
    ),
    "train.json.tar.gz": (
        "96d5f2e5c558c851e1101d8534d5ffaa553cdabd6b2c4c721b323f1be8a61b94",
        None,
        230_885_383,
    ),
    "train_mini.tar.gz": (
        "faedb949568676e35cc0088b78090a761ab29e30f53edaa65dcad87940fdc7b5",
        "db6ed8330e634445efc8fec83ae81442",
        44_636_137_542,
    ),
    "train_mini.json.tar.gz": (
        "7dffc85ec942b603f828229b20cf89c72072310a29954c74997d107d764c2789",
        None,
        46_769_466,
    ),
    "val.tar.gz": (
        "f162b45fed0f676839f335968990fa0f236433d6123bb07b7591f6732c56455d",
        "f6f6e0e242e3d4c9569ba56400938afc",
        8_931_661_582,
    ),
    "val.json.tar.gz": (
        "d63dfdb2e5fbc0262373833ed3fd02030787bd4b5cf2bd4ff3caea6d3f4e2970",
        None,
        9_797_665,
    ),
}


def _inat2021(names: tuple[str, ...]) -> tuple[ArchiveFile, ...]:
    files = []
    for name in names:
        sha, md5, size = _INAT_2021[name]
        files.append(
            ArchiveFile(
                f"{_INAT}/2021/{name}", name, sha, md5, size, checksum_source=f"{_TFDS}; {_TV}"
            )
        )
    return tuple(files)


_register(
    DownloadSpec(
        name="inat2021",
        title="iNaturalist 2021 (10,000 species, 2.7M training images)",
        homepage="https://github.com/visipedia/inat_comp/tree/master/2021",
        terms=_INAT_TERMS,
        files=_inat2021(("train.json.tar.gz", "val.json.tar.gz", "val.tar.gz", "train.tar.gz")),
        expect=("train.json", "val.json", "train", "val"),
        source="inat",
    )
)
_register(
    DownloadSpec(
        name="inat2021_mini",
        title="iNaturalist 2021 mini (10,000 species, 50 training images each)",
        homepage="https://github.com/visipedia/inat_comp/tree/master/2021",
        terms=_INAT_TERMS,
        files=_inat2021(
            ("train_mini.json.tar.gz", "val.json.tar.gz", "val.tar.gz", "train_mini.tar.gz")
        ),
        expect=("train_mini.json", "val.json", "train_mini", "val"),
        source="inat",
    )
)
_register(
    DownloadSpec(
        name="inat2018",
        title="iNaturalist 2018 (8,142 species)",
        homepage="https://github.com/visipedia/inat_comp/tree/master/2018",
        terms=_INAT_TERMS,
        files=(
            ArchiveFile(
                f"{_INAT}/2018/train2018.json.tar.gz",
                "train2018.json.tar.gz",
                sha256="be550dd4e2692458e508dd03e3a8d79f087453e2ad570a438a4ff198a7abc68f",
                size=20_951_917,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                f"{_INAT}/2018/val2018.json.tar.gz",
                "val2018.json.tar.gz",
                sha256="e23c47d61d3aa2a9095090dbc49de861445d9a8144884a78222873f11f7ef43e",
                size=1_276_686,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                f"{_INAT}/2018/categories.json.tar.gz",
                "categories.json.tar.gz",
                sha256="2287211e8da582419dc2ca66736005fdb079e0a89eaf38936a441d8277a8162e",
                size=139_473,
                checksum_source=_TFDS,
            ),
            ArchiveFile(
                f"{_INAT}/2018/train_val2018.tar.gz",
                "train_val2018.tar.gz",
                sha256="276522b02b65d98ee5168a17415b2b1ec971b035bd62959e37b80b1092130495",
                md5="b1c6952ce38f31868cc50ea72d066cc3",
                size=127_945_569_561,
                checksum_source=f"{_TFDS}; {_TV}",
            ),
        ),
        expect=("train2018.json", "val2018.json", "categories.json", "train_val2018"),
        source="inat",
    )
)
_register(
    DownloadSpec(
        name="inat2017",
        title="iNaturalist 2017 (5,089 species)",
        homepage="https://github.com/visipedia/inat_comp/tree/master/2017",
        terms=_INAT_TERMS,
        files=(
            ArchiveFile(
                f"{_INAT}/2017/train_val2017.zip",
                "train_val2017.zip",
                sha256="e030b52cca0b54709b0b976ddcf811513e05771cabbae4ac5899a56599e9066c",
                size=26_836_398,
                checksum_source=f"{_TFDS}, recorded from the earlier Caltech host of the same file",
            ),
            ArchiveFile(
                f"{_INAT}/2017/train_val_images.tar.gz",
                "train_val_images.tar.gz",
                sha256="c7675e4a3190a13ccd0e1b9d3ae6c6c5de978ac8e794c5623503f1e7880ce4a1",
                md5="7c784ea5e424efaec655bd392f87301f",
                size=198_765_436_676,
                checksum_source=f"{_TFDS} (earlier Caltech host); {_TV}",
            ),
        ),
        expect=("train2017.json", "val2017.json", "train_val_images"),
        source="inat",
    )
)


# ---- HTTP ---------------------------------------------------------------------------------
def mirrored_url(url: str, mirror: str | None) -> str:
    """`url` with its scheme and host replaced by `mirror` (a base URL); the path is kept."""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + path


def file_digests(path: Path) -> tuple[str, str]:
    """SHA-256 and MD5 hex digests of a file, read in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def verify_file(
    path: Path,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    *,
    name: str | None = None,
) -> None:
    """Raise DataError naming the file, the expected and the actual value on any mismatch."""
    label = name or str(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DataError(f"{label}: size mismatch: expected {size} bytes, got {actual_size}")
    if sha256 is None and md5 is None:
        return
    actual_sha, actual_md5 = file_digests(path)
    if sha256 is not None and actual_sha != sha256.lower():
        raise DataError(f"{label}: SHA-256 mismatch: expected {sha256}, got {actual_sha}")
    if md5 is not None and actual_md5 != md5.lower():
        raise DataError(f"{label}: MD5 mismatch: expected {md5}, got {actual_md5}")


def default_deadline(size: int | None) -> float:
    """Seconds a download of `size` bytes may take in all: 5 minutes plus the time at
    256 KiB/s (a stalled or trickling mirror is stopped; a slow real one is not), or 6 hours
    when the size is not known."""
    if size is None:
        return 6 * 3600.0
    return 300.0 + size / _MIN_RATE


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    md5: str | None = None,
    *,
    size: int | None = None,
    retries: int = 2,
    progress: Progress | None = None,
    deadline_s: float | None = None,
    read_timeout_s: float = _TIMEOUT_S,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with HTTP Range, verify, rename atomically.

    A checksum or size mismatch deletes the partial file and raises DataError, and so does a
    server that sends more bytes than `size` (or than its Content-Length). A broken connection
    or a read that waits more than `read_timeout_s` is retried `retries` times, each time
    resuming where the last one stopped; after that the partial file is kept so the next call
    resumes it. The whole call ends with a DataError after `deadline_s` seconds (default:
    `default_deadline(size)`), keeping the partial file.
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            verify_file(dest, sha256, md5, size)
            return dest
        except DataError:
            dest.unlink()  # a stale or corrupt copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    seconds = deadline_s if deadline_s is not None else default_deadline(size)
    deadline = _Deadline(time.monotonic() + seconds, seconds, url, part)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, size, progress, deadline, read_timeout_s)
            break
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500 and err.code != 429:
                part.unlink(missing_ok=True)
                raise DataError(f"{url}: HTTP {err.code} {err.reason}") from None
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DataError(
                    f"{url}: download interrupted ({err}); {kept} bytes kept in {part}, "
                    "run again to resume"
                ) from None
            deadline.check(part.stat().st_size if part.exists() else 0, size)
            time.sleep(min(2**attempt, 10, max(deadline.left(), 0)))
    try:
        verify_file(part, sha256, md5, size, name=f"{dest} (from {url})")
    except DataError as err:
        part.unlink(missing_ok=True)  # a corrupt download is useless for resuming
        raise DataError(f"{err}; the download was deleted") from None
    os.replace(part, dest)
    return dest


@dataclass
class _Deadline:
    """When a download must have finished, and the DataError that says it did not."""

    at: float  # time.monotonic()
    seconds: float
    url: str
    part: Path

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, done: int, total: int | None) -> None:
        if self.left() >= 0:
            return
        of = f" of {total}" if total is not None else ""
        raise DataError(
            f"{self.url}: not finished within the deadline of {self.seconds:g} s "
            f"({done}{of} bytes); the {done} bytes are kept in {self.part}, run again to resume "
            "(or set a longer --deadline, or another --mirror)"
        )


def _fetch(
    url: str,
    part: Path,
    size: int | None,
    progress: Progress | None,
    deadline: _Deadline,
    read_timeout_s: float,
) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return  # a complete partial file from an earlier run, not yet verified
    if size is not None and have > size:
        part.unlink()  # more than the file holds: nothing in it can be trusted
        have = 0
    deadline.check(have, size)
    request = urllib.request.Request(url, headers={"User-Agent": "lookcloser"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    # The timeout holds for the connection and for each read, never longer than the deadline.
    timeout = max(min(read_timeout_s, deadline.left()), 0.001)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            return  # nothing left to fetch: the partial file is already whole
        raise
    with response:
        if have and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                raise urllib.error.URLError(f"server resumed at byte {start}, expected {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored Range: start over
        length = response.headers.get("Content-Length")
        announced = have + int(length) if length and length.isdigit() else None
        if size is not None and announced is not None and announced != size:
            part.unlink(missing_ok=True)
            raise DataError(
                f"{url}: the server announces {announced} bytes (Content-Length), but the "
                f"file has {size}; refusing it (a wrong file or mirror?)"
            )
        # Never more than the file holds: an endless body would fill the disk.
        limit = size if size is not None else announced
        total = limit
        done = have
        with part.open(mode) as f:
            while True:
                want = _CHUNK if limit is None else min(_CHUNK, limit - done + 1)
                try:
                    # read1: returns what has arrived, so a trickle still meets the deadline.
                    chunk = response.read1(want)
                except http.client.IncompleteRead as err:
                    f.write(err.partial)  # keep what arrived, so a retry resumes after it
                    raise ConnectionError(
                        f"connection closed after {done + len(err.partial)} bytes"
                    ) from None
                if not chunk:
                    break
                if limit is not None and done + len(chunk) > limit:
                    f.close()
                    part.unlink(missing_ok=True)
                    raise DataError(
                        f"{url}: the server sent more than the expected {limit} bytes"
                        f"{' (Content-Length)' if size is None else ''}; refusing the rest "
                        "(a wrong file or mirror?); the download was deleted"
                    )
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(part.name[: -len(".part")], done, total)
                deadline.check(done, total)
        if total is not None and done < total:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")


class ProgressLines:
    """A `Progress` that prints a line per file to stderr: at the start, at each tenth, at
    least every `every_s` seconds while bytes arrive, and at the end, with the rate."""

    def __init__(self, every_s: float = 5.0, stream=None) -> None:
        self.every_s = every_s
        self.stream = stream
        self.shown: dict[str, tuple[int, float]] = {}  # name -> (tenth, time of the line)
        self.started: dict[str, tuple[int, float]] = {}  # name -> (bytes, time) at first call

    def __call__(self, name: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        first_done, first_time = self.started.setdefault(name, (done, now))
        tenth = 10 * done // total if total else -1
        last = self.shown.get(name)
        finished = total is not None and done >= total
        if last is not None and last[0] == tenth and now - last[1] < self.every_s and not finished:
            return
        self.shown[name] = (tenth, now)
        size = f"{done / 2**20:.1f}" + (f" / {total / 2**20:.1f}" if total else "")
        elapsed = now - first_time
        rate = (done - first_done) / elapsed if elapsed > 0 else 0.0
        line = f"{name}: {size} MiB"
        if rate > 0:
            line += f", {rate / 2**20:.2f} MiB/s"
            if total and not finished:
                line += f", about {_duration((total - done) / rate)} left"
        print(line, file=self.stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _content_range_start(header: str | None) -> int:
    # "bytes 100-199/200"
    if not header or not header.startswith("bytes "):
        return -1
    try:
        return int(header[6:].split("-", 1)[0])
    except ValueError:
        return -1


# ---- extraction ---------------------------------------------------------------------------
# Linux gives up after 40 symlinks in one path lookup; a longer chain is a loop or an attack.
_MAX_LINK_HOPS = 40
# What tarfile raises when its `data` filter refuses a member (Python >= 3.11.4).
_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)
# A place inside the target folder, as real names: no symlink, '.' or '..' left in it.
_Location = tuple[str, ...]


def safe_extract(archive: str | Path, target: str | Path) -> list[str]:
    """Extract a tar (any compression) or zip into `target`, refusing any member that escapes it.

    Every member is checked before anything is written, so a refused archive leaves `target`
    as it was. Refused: absolute paths, drive letters, backslashes, `..` components; a member
    whose path or link resolves outside `target`, following the symlinks made by earlier
    members (chains included) and those already in `target`; a hard link to anything but a
    file extracted before it; device files and FIFOs. Returns the top-level names extracted.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, target)
    # Symlinks already in `target` (an earlier archive's, the user's) are read from disk; a
    # fresh folder has none, which saves a system call per path component.
    disk = target if any(target.iterdir()) else None
    wanted = _check_tar(archive, disk)
    # Pass 2 checks each member again before writing it, in case the file changed meanwhile.
    names = _Namespace(archive, disk, wanted, strict=True)
    top: set[str] = set()

    def extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path, location, source = names.check(member)
        if path.parts:
            top.add(path.parts[0])
        data_filter = _data_filter()
        if source is not None:
            _make_hard_link(archive, member, target, location, source)
        elif data_filter is None:
            tar.extract(member, target)
        else:
            tar.extract(member, target, filter=data_filter)  # defence in depth

    _each_member(archive, extract)
    names.check_links()
    return sorted(top - {"."})


def _data_filter() -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None] | None:
    """tarfile's `data` extraction filter, or None on Python 3.11.0-3.11.3, which has none."""
    # Looked up at each call, so a test can delete tarfile.data_filter to act like those.
    return getattr(tarfile, "data_filter", None)


def _check_tar(archive: Path, disk: Path | None) -> set[_Location]:
    """Check every member of a tar without writing; returns the hard-link sources to track."""
    names = _Namespace(archive, disk, set(), strict=False)

    def check(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        names.check(member)

    _each_member(archive, check)
    wanted = names.unverified
    if wanted:
        # Which files the hard links need is known only now: a second pass tracks just those,
        # as remembering every file would not fit in memory for millions of members.
        names = _Namespace(archive, disk, wanted, strict=True)
        _each_member(archive, check)
    names.check_links()
    return wanted


def _each_member(archive: Path, visit: Callable[[tarfile.TarFile, tarfile.TarInfo], None]) -> None:
    """Call `visit` on each member of a tar in one streaming pass, errors as DataError."""
    try:
        # Streaming mode: one pass, no member index in memory. Closed by `with tar` below.
        tar = tarfile.open(archive, "r|*")  # noqa: SIM115
    except tarfile.TarError as err:
        raise DataError(f"{archive}: not a tar or zip archive ({err})") from None
    with tar:
        try:
            for count, member in enumerate(tar, start=1):
                visit(tar, member)
                if count % 10_000 == 0:
                    tar.members = []  # streaming mode needs no history; keeps memory flat
        except _FILTER_ERRORS as err:
            # Only reached if our own checks let something through; still name the member.
            name = getattr(getattr(err, "tarinfo", None), "name", "?")
            raise DataError(
                f"{archive}: member {name!r} was refused by tarfile's data filter ({err}); "
                "refusing to extract"
            ) from None
        except tarfile.TarError as err:
            raise DataError(f"{archive}: corrupt or truncated archive ({err})") from None


class _Escape(Exception):
    """A path that leaves the target folder, or loops, while its symlinks are followed."""


class _Namespace:
    """What an archive's members have made of the target so far, to resolve paths as the OS will.

    Files and folders are written through a symlink already at their name; a symlink or hard
    link replaces what is at its name, so only its folder is followed. A symlink's text is
    read from its own folder, a hard link's from the archive root.
    """

    def __init__(
        self, archive: Path, disk: Path | None, wanted: set[_Location], strict: bool
    ) -> None:
        self.archive = archive
        self.disk = disk  # where to look for symlinks the archive did not make; None: nowhere
        # Symlinks made by earlier members: where each is -> (its text, the member's name).
        self.links: dict[_Location, tuple[str, str]] = {}
        # Places where a hard link replaced a symlink that pass 1 still sees on disk.
        self.replaced: set[_Location] = set()
        # Files extracted so far, among `wanted` only (hard-link sources).
        self.wanted = wanted
        self.files: set[_Location] = set()
        # strict: refuse a hard link to a place not known to hold a file; otherwise note its
        # source in `unverified`, for a pass that tracks it.
        self.strict = strict
        self.unverified: set[_Location] = set()

    def check(self, member: tarfile.TarInfo) -> tuple[PurePosixPath, _Location, _Location | None]:
        """Refuse `member` unless all it writes stays inside; its path, location, link source."""
        name = member.name
        path = _check_member_path(self.archive, name)
        parts = path.parts
        if member.issym() or member.islnk():
            kind = "symlink" if member.issym() else "hard link"
            text = member.linkname
            if text.startswith("/") or PureWindowsPath(text).anchor:
                raise self._refuse(name, f"is a {kind} to the absolute path {text!r}")
            if "\\" in text:
                raise self._refuse(
                    name, f"is a {kind} to {text!r}, with a backslash (a separator on Windows)"
                )
            if not parts:
                raise self._refuse(name, f"is a {kind} in place of the target folder")
            location = (*self._follow(name, parts[:-1]), parts[-1])
            if member.issym():
                self._follow(
                    name, (*location[:-1], *text.split("/")), f"is a {kind} to {text!r}, which "
                )
                self.links[location] = (text, name)
                self.files.discard(location)
                return path, location, None
            source = self._follow(name, tuple(text.split("/")), f"is a {kind} to {text!r}, which ")
            if not self._holds_file(source):
                if self.strict:
                    raise self._refuse(
                        name, f"is a hard link to {text!r}, which is not a file extracted before it"
                    )
                self.unverified.add(source)
            if self.links.pop(location, None) is None and self.disk is not None:
                self.replaced.add(location)
            if location in self.wanted:
                self.files.add(location)
            return path, location, source
        if not (member.isfile() or member.isdir()):
            raise self._refuse(name, "is a device file or FIFO")
        location = self._follow(name, parts)
        if member.isfile():
            if not location:
                raise self._refuse(name, "is a file in place of the target folder")
            if location in self.wanted:
                self.files.add(location)
        return path, location, None

    def check_links(self) -> None:
        """Refuse a symlink that was inside when made but leads outside through a later one."""
        for location, (text, name) in self.links.items():
            parts = (*location[:-1], *text.split("/"))
            self._follow(name, parts, f"is a symlink to {text!r}, which with later members ")

    def _refuse(self, name: str, reason: str) -> DataError:
        return DataError(f"{self.archive}: member {name!r} {reason}; refusing to extract")

    def _follow(self, name: str, parts: tuple[str, ...], what: str = "") -> _Location:
        try:
            return self._resolve(parts)
        except _Escape as err:
            raise self._refuse(name, f"{what}{err}") from None

    def _resolve(self, parts: tuple[str, ...]) -> _Location:
        # Like the kernel: one component at a time, a symlink's text replacing its name.
        pending = list(reversed(parts))
        done: list[str] = []
        hops, via = 0, ""
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise _Escape("resolves outside the target folder" + via)
                done.pop()
                continue
            done.append(part)
            text = self._link_at(tuple(done))
            if text is None:
                continue
            hops += 1
            via = f" through symlink {'/'.join(done)!r} -> {text!r}"
            if hops > _MAX_LINK_HOPS:
                raise _Escape(f"passes through more than {_MAX_LINK_HOPS} symlinks{via} (a loop?)")
            if text.startswith("/"):  # only ones already on disk; the archive's are refused
                raise _Escape(f"follows the absolute symlink {'/'.join(done)!r} -> {text!r}")
            done.pop()
            pending.extend(reversed(text.split("/")))
        return tuple(done)

    def _link_at(self, location: _Location) -> str | None:
        link = self.links.get(location)
        if link is not None:
            return link[0]
        if self.disk is None or location in self.replaced:
            return None
        try:
            return os.readlink(self.disk.joinpath(*location))
        except OSError:  # not a symlink, or nothing there
            return None

    def _holds_file(self, location: _Location) -> bool:
        if location in self.files:
            return True
        if self.disk is None or not location:
            return False
        try:
            return stat.S_ISREG(os.lstat(self.disk.joinpath(*location)).st_mode)
        except OSError:
            return False


def _make_hard_link(
    archive: Path, member: tarfile.TarInfo, target: Path, location: _Location, source: _Location
) -> None:
    # Made here rather than by tarfile: where os.link fails, tarfile falls back to re-extracting
    # the member named by the link, which may be a symlink that then lands somewhere else.
    data_filter = _data_filter()
    if data_filter is not None:
        data_filter(member, str(target))  # defence in depth, as for the other members
    destination, source_path = target.joinpath(*location), target.joinpath(*source)
    if destination.is_dir() and not destination.is_symlink():
        raise DataError(
            f"{archive}: member {member.name!r} is a hard link in place of a folder; "
            "refusing to extract"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(destination):
        destination.unlink()  # as tar does: the link replaces what was there
    try:
        os.link(source_path, destination, follow_symlinks=False)
    except OSError:  # a file system without hard links: a copy holds the same bytes
        shutil.copy2(source_path, destination, follow_symlinks=False)


def _check_member_path(archive: Path, name: str) -> PurePosixPath:
    """Refuse a member name that is absolute, has a drive, climbs with '..' or has a backslash."""
    path = PurePosixPath(name)
    absolute, climbs = path.is_absolute(), ".." in path.parts
    if "\\" in name or ":" in name:
        # Windows reads a backslash as a separator and 'C:' as a drive.
        windows = PureWindowsPath(name)
        absolute, climbs = absolute or bool(windows.anchor), climbs or ".." in windows.parts
    if absolute:
        raise DataError(
            f"{archive}: member {name!r} has an absolute path or a drive; refusing to extract"
        )
    if climbs:
        raise DataError(f"{archive}: member {name!r} leaves the target folder via '..'; refusing")
    if "\\" in name:
        raise DataError(
            f"{archive}: member {name!r} has a backslash (a separator on Windows); refusing"
        )
    return path


def _extract_zip(archive: Path, target: Path) -> list[str]:
    top: set[str] = set()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        # Every member is checked first, so a refused archive writes nothing.
        for info in members:
            path = _check_member_path(archive, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no type
            if kind == stat.S_IFLNK:
                raise DataError(f"{archive}: member {info.filename!r} is a symlink; refusing")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"{archive}: member {info.filename!r} is not a regular file")
            if path.parts:
                top.add(path.parts[0])
        for info in members:
            zf.extract(info, target)
    return sorted(top - {"."})


# ---- datasets -----------------------------------------------------------------------------
def dataset_spec(name: str) -> DownloadSpec:
    """The download spec registered under `name`, or a DataError listing the known names."""
    if name not in DOWNLOADS:
        raise DataError(f"unknown dataset {name!r}; downloadable: {', '.join(sorted(DOWNLOADS))}")
    return DOWNLOADS[name]


def is_ready(root: str | Path) -> bool:
    """Whether `root` holds a dataset that `download_dataset` finished preparing."""
    root = Path(root)
    return (root / READY_MARKER).is_file() and not (root / INCOMPLETE_MARKER).exists()


def check_not_incomplete(root: str | Path) -> None:
    """Raise DataError when `root` is a download that was interrupted before it completed."""
    if (Path(root) / INCOMPLETE_MARKER).exists():
        raise DataError(
            f"{root}: the dataset download was interrupted and is incomplete; "
            "run `lookcloser data download` again to finish it"
        )


def download_dataset(
    name: str,
    root: str | Path,
    mirror: str | None = None,
    *,
    keep_archives: bool = False,
    progress: Progress | None = None,
    deadline_s: float | None = None,
    read_timeout_s: float = _TIMEOUT_S,
) -> Path:
    """Download, verify and extract dataset `name` into `root`; returns `root` once ready.

    `mirror` (or the LOOKCLOSER_MIRROR environment variable) is a base URL that replaces the
    scheme and host of every official URL. A dataset whose terms need a manual step raises
    DataError with instructions until its files have been put into `root`. All downloads
    together must finish within `deadline_s` seconds (default: `default_deadline` of their
    total size); each read may wait `read_timeout_s`.
    """
    spec = dataset_spec(name)
    sizes = [f.size for f in spec.files]
    seconds = deadline_s
    if seconds is None:
        seconds = default_deadline(None if None in sizes else sum(s or 0 for s in sizes))
    end = time.monotonic() + seconds
    root = Path(root).expanduser().absolute()
    if is_ready(root):
        return root
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    downloads = root / DOWNLOADS_DIR
    if spec.manual:
        missing = [f for f in spec.files if not (root / f.filename).is_file()]
        if missing:
            names = ", ".join(f.filename for f in missing)
            raise DataError(f"{spec.title}: missing {names}. " + spec.manual.format(root=root))
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.lookcloser-staging")
    try:
        if staging.exists():
            shutil.rmtree(staging)  # left over from an interrupted extraction
        staging.mkdir()
        local: list[tuple[ArchiveFile, Path]] = []
        for file in spec.files:
            if spec.manual:
                path = root / file.filename
                verify_file(path, file.sha256, file.md5, file.size)
            else:
                path = download_file(
                    mirrored_url(file.url, mirror),
                    downloads / file.filename,
                    file.sha256,
                    file.md5,
                    size=file.size,
                    progress=progress,
                    deadline_s=end - time.monotonic(),
                    read_timeout_s=read_timeout_s,
                )
            local.append((file, path))
        for file, path in local:
            if file.extract:
                safe_extract(path, staging)
            else:
                shutil.copy2(path, staging / file.filename)
        missing = [p for p in spec.expect if not (staging / p).exists()]
        if missing:
            raise DataError(
                f"{spec.title}: after extraction, expected {', '.join(missing)} in the dataset "
                "folder; the archives do not have the official layout"
            )
        # From here on `root` holds part of the dataset until the ready marker is written.
        (root / INCOMPLETE_MARKER).touch()
        for entry in sorted(staging.iterdir()):
            destination = root / entry.name
            if destination.exists():
                _remove(destination)
            os.replace(entry, destination)
        staging.rmdir()
        record = {
            "dataset": name,
            "files": [{"filename": f.filename, "sha256": f.sha256, "md5": f.md5} for f, _ in local],
        }
        (root / READY_MARKER).write_text(json.dumps(record, indent=1) + "\n")
        (root / INCOMPLETE_MARKER).unlink()
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        _tidy_failed(root, downloads, created)
        raise
    if not keep_archives:
        shutil.rmtree(downloads, ignore_errors=True)  # files the user put there are kept
    return root


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _tidy_failed(root: Path, downloads: Path, created: bool) -> None:
    # Keep partial downloads (the next run resumes them) and the incomplete marker of a
    # half-moved dataset; drop folders that hold nothing.
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    if created and not any(root.iterdir()):
        root.rmdir()
