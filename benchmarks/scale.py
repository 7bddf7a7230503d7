"""Scaling benchmark: wall time and peak memory of train / eval / predict / compare / serve
start-up as the number of classes and of test images grows (issue 25).

Tiny images (32 px PNGs) and a tiny model (resnet18, no pretrained weights, 1 epoch, batch 256,
2 loader workers, no validation split): what grows is what matters, not the speed. Each case
is an ImageFolder tree `train/CLASS/*.png`, `test/CLASS/*.png` made once under the work
folder (outside the repository) and reused while its marker file (SET.json) matches.
Axes (2 training images a class throughout):
- classes: 100 / 1,000 / 10,000 classes, 1 test image a class;
- images: 1,000 / 10,000 / 100,000 test images over 100 classes;
- headline: 10,000 classes x 100,000 test images (iNat's validation split, in tiny).

Each command runs as a child process of the installed `lookcloser` CLI (so the same script
measures the code before and after a change): its wall time and its peak RSS (the largest
resident set of the process or of any of its children, from wait4). `train` is split by what
can be seen from outside: start-up (until its first DataLoader worker starts), the training
(until last.ckpt is written), and the end of the run (test pass, then metrics + confusion
files after it, then the model), with the main process's peak RSS sampled from /proc. A
second `train` on the unchanged folder is stopped when its training starts: its start-up is
what a re-run pays for (data verification). Sizes are in GB = 10^9 bytes. A command whose
main process grows past --max-rss (default 16 GB) is stopped and recorded as failed, so that a
case too large for the machine does not take the machine's other work down with it.

    python benchmarks/scale.py --axis classes --sizes 100            # the smallest case
    python benchmarks/scale.py --axis classes images --records       # both axes, then
    python benchmarks/results.py                                     # the results page
    python benchmarks/scale.py --axis headline --records
    python benchmarks/scale.py --axis images --sizes 2000 --make-only  # time making images
    mkdir /tmp/head && git archive HEAD src | tar -x -C /tmp/head    # the committed code,
    python benchmarks/scale.py --sizes 100 --src /tmp/head/src --code "$(git rev-parse --short HEAD)"
                                                                     # before a change

`--sizes` takes numbers (100, 1k, 10k, 100k, or any other count: classes on the classes axis,
test images on the images axis), or AXIS=SIZE to apply to one axis only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RECORDS, append_records, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path("/work/bench-scale")
SET_VERSION = 1  # bump when the images change: older sets are made again
IMAGE_SIDE = 32
TRAIN_PER_CLASS = 2
STEPS = ("eval", "predict", "compare", "serve")  # after `train`, on its model
# The training every case runs (overrides of `lookcloser train`).
TRAIN_SETTINGS = {
    "model.backbone": "resnet18",
    "model.pretrained": "false",
    "data.image_size": "32",
    "trainer.epochs": "1",
    "data.batch_size": "256",
    "data.num_workers": "2",
    "data.val_fraction": "0",
}
SAMPLE_S = 0.05  # /proc sampling interval


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    axis: str
    classes: int
    test_images: int
    train_per_class: int = TRAIN_PER_CLASS

    @property
    def train_images(self) -> int:
        return self.classes * self.train_per_class

    @property
    def name(self) -> str:
        return f"c{self.classes}-tr{self.train_per_class}-te{self.test_images}"


def case_for(axis: str, size: int) -> Case:
    if axis == "classes":
        return Case(axis, size, size)
    if axis == "images":
        return Case(axis, 100, size)
    return Case(axis, 10_000, 100_000)


AXES = {
    "classes": [100, 1_000, 10_000],
    "images": [1_000, 10_000, 100_000],
    "headline": [100_000],
}


def parse_count(text: str) -> int:
    """100, 1k, 10k, 1.5M, 2000 -> an int."""
    text = text.strip().lower().replace(",", "").replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not a count (e.g. 100, 1k, 10k)") from None
    if value < 1 or value != int(value):
        raise SystemExit(f"--sizes: {text!r} is not a whole positive count")
    return int(value)


def select_cases(axes: list[str], sizes: list[str] | None) -> list[Case]:
    """The cases of the chosen axes, limited to --sizes (plain: every axis; AXIS=N: one)."""
    axes = list(AXES) if "all" in axes else list(dict.fromkeys(axes))
    wanted: dict[str, list[int]] = {}
    for item in sizes or []:
        axis, _, value = item.rpartition("=")
        if axis and axis not in AXES:
            raise SystemExit(f"--sizes {item}: unknown axis {axis!r} (classes, images, headline)")
        for a in [axis] if axis else axes:
            wanted.setdefault(a, []).append(parse_count(value))
    cases = []
    for axis in axes:
        if axis == "headline":
            cases.append(case_for(axis, 0))
            continue
        if sizes and axis not in wanted:
            continue
        for size in wanted.get(axis, AXES[axis]):
            cases.append(case_for(axis, size))
    return cases


# ----------------------------------------------------------------------------- images


def _class_look(c: int):
    import numpy as np

    rng = np.random.default_rng(c)
    return rng.integers(40, 216, 3, dtype=np.uint8), rng.integers(0, 256, (2, 3), dtype=np.uint8)


def _write_class(job: tuple[str, int, int, int]) -> int:
    """Write one class's images of one split: a class colour and two patches, the patch
    position moved by the image's id, and the id written in bits along the top row, so that
    every file differs (data checks treat equal bytes as duplicates)."""
    import numpy as np
    from PIL import Image

    folder, c, first_uid, count = job
    os.makedirs(folder, exist_ok=True)
    background, patches = _class_look(c)
    bit = np.arange(IMAGE_SIDE)
    for uid in range(first_uid, first_uid + count):
        a = np.empty((IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
        a[:] = background
        x, y = 4 + uid % 7, 6 + (uid // 7) % 7
        a[y : y + 8, x : x + 8] = patches[0]
        a[y + 10 : y + 16, x + 10 : x + 16] = patches[1]
        a[0, :, 0] = ((uid >> bit) & 1) * 255
        Image.fromarray(a).save(os.path.join(folder, f"{uid:08d}.png"), compress_level=1)
    return count


def make_set(root: Path, case: Case, jobs: int) -> dict:
    """The case's ImageFolder tree under root (reused when its SET.json matches); returns the
    marker's content plus `made_s` (None when reused)."""
    params = {
        "version": SET_VERSION,
        "side": IMAGE_SIDE,
        "classes": case.classes,
        "train_per_class": case.train_per_class,
        "test_images": case.test_images,
    }
    marker = root / "SET.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return {**json.loads(marker.read_text()), "made_s": None}
    if root.exists():  # an older or unfinished set of ours
        shutil.rmtree(root)
    names = [f"class{c:05d}" for c in range(case.classes)]
    work: list[tuple[str, int, int, int]] = []
    uid = 0
    for c, name in enumerate(names):
        work.append((str(root / "train" / name), c, uid, case.train_per_class))
        uid += case.train_per_class
    base, extra = divmod(case.test_images, case.classes)
    for c, name in enumerate(names):  # the first `extra` classes get one more test image
        count = base + (c < extra)
        if count:
            work.append((str(root / "test" / name), c, uid, count))
            uid += count
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        total = sum(pool.map(_write_class, work, chunksize=max(1, len(work) // (8 * jobs))))
    made = time.perf_counter() - start
    info = {"params": params, "images": total, "made_s": round(made, 2)}
    marker.write_text(json.dumps(info) + "\n")  # last: a set without it is made again
    return info


# ----------------------------------------------------------------------------- children


@dataclass
class Sample:
    t: float  # seconds since the child started
    hwm_kb: int  # main process's peak RSS so far
    rss_kb: int
    children: int  # live worker processes (DataLoader workers)


@dataclass
class Measure:
    wall_s: float
    peak_rss_kb: int  # largest of the process and its waited-for children (wait4)
    returncode: int
    start: float  # time.time() at spawn
    samples: list[Sample] = field(default_factory=list)
    stopped: bool = False  # stopped by `until`
    timed_out: bool = False
    over_memory: bool = False  # stopped past --max-rss


def _status(pid: int) -> tuple[int, int]:
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


def _workers(pid: int) -> int:
    """Live worker processes of pid: children running its own command line (forked, as
    DataLoader workers are) or multiprocessing's; a helper command (uname, git) is not one."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        own = f.read()
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = f.read().split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    line = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            count += line == own or b"multiprocessing" in line
    return count


def run_child(
    argv: list[str],
    log: Path,
    stdout: Path | None = None,
    until: Callable[[Sample], bool] | None = None,
    timeout: float = 3600,
    max_rss_kb: int = 0,
) -> Measure:
    """Run argv (its own session), sampling /proc until it exits; `until(sample)` True stops
    it (SIGTERM to its process group, SIGKILL 5 s later)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(stdout or log.with_suffix(".out"), "wb")  # noqa: SIM115 (closed below)
    err = open(log.with_suffix(".err"), "wb")  # noqa: SIM115
    start = time.time()
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
    samples: list[Sample] = []
    flags = {"stopped": False, "timed_out": False, "over_memory": False}
    exited = threading.Event()

    def stop(reason: str) -> None:
        flags[reason] = True
        try:
            os.killpg(child.pid, signal.SIGTERM)
            if not exited.wait(5):
                os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def sample() -> None:
        while True:
            try:
                hwm, rss = _status(child.pid)
                s = Sample(time.perf_counter() - t0, hwm, rss, _workers(child.pid))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            if s.hwm_kb == 0:  # a zombie: exited, not yet waited for
                return
            samples.append(s)
            if until is not None and not flags["stopped"] and until(s):
                stop("stopped")
                return
            if s.t > timeout:
                stop("timed_out")
                return
            if max_rss_kb and s.rss_kb > max_rss_kb:
                stop("over_memory")
                return
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4, not Popen.wait: it also gives the child's peak RSS (kB on Linux).
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    exited.set()
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.join(timeout=30)
    out.close()
    err.close()
    return Measure(
        round(wall, 2),
        usage.ru_maxrss,
        child.returncode,
        start,
        samples,
        flags["stopped"],
        flags["timed_out"],
        flags["over_memory"],
    )


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under path (0, 0 when absent)."""
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    for p in path.rglob("*") if path.exists() else []:
        if p.is_file():
            total += p.stat().st_size
            files += 1
    return total, files


# ----------------------------------------------------------------------------- steps


@dataclass
class Session:
    cli: str
    work: Path
    run_id: str
    timeout: float
    max_rss_kb: int
    base: dict  # fields every record of this session carries
    keep: bool = False
    second_start: bool = True

    def logs(self, case: Case, step: str) -> Path:
        return self.work / "logs" / self.run_id / f"{case.name}-{step}.log"


def train_phases(m: Measure, run_dir: Path) -> dict:
    """Start-up / training / end-of-run split of a `train` child, from its samples (workers
    alive, main RSS) and the times its files were written."""
    phases: dict = {}
    first = next((s for s in m.samples if s.children), None)
    ckpts = list(run_dir.rglob("*.ckpt"))
    if first is None or not ckpts:
        return phases
    fit_end = max(p.stat().st_mtime for p in ckpts) - m.start
    before = [s for s in m.samples if s.t <= fit_end]
    after = [s for s in m.samples if s.t > fit_end]
    phases["startup_s"] = round(first.t, 2)
    phases["startup_rss_kb"] = first.hwm_kb
    phases["training_s"] = round(fit_end - first.t, 2)
    phases["training_rss_kb"] = before[-1].hwm_kb if before else first.hwm_kb
    phases["end_s"] = round(m.wall_s - fit_end, 2)
    if after:
        phases["end_rss_added_kb"] = max(0, after[-1].hwm_kb - phases["training_rss_kb"])
    # The test pass: from the checkpoint to the last moment its loader workers were seen
    # (the training loader's workers may outlive the checkpoint by a moment).
    with_workers = [s.t for s in after if s.children]
    metrics_json = run_dir / "metrics.json"
    if with_workers and metrics_json.exists():
        pass_end = with_workers[-1] + SAMPLE_S / 2
        written = metrics_json.stat().st_mtime - m.start
        phases["test_pass_s"] = round(pass_end - fit_end, 2)
        phases["after_pass_s"] = round(max(0.0, written - pass_end), 2)
        phases["model_save_s"] = round(max(0.0, m.wall_s - written), 2)
    return phases


def measure_case(session: Session, case: Case, root: Path, steps: list[str]) -> list[dict]:
    """Every step on one case; one record each (a failed step is recorded with its error)."""
    records: list[dict] = []
    out = session.work / "out" / f"{case.name}-{session.run_id}"
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    common = {
        **session.base,
        "axis": case.axis,
        "classes": case.classes,
        "train_images": case.train_images,
        "test_images": case.test_images,
    }

    def run(step: str, argv: list[str], **kwargs) -> tuple[Measure, Path]:
        log = session.logs(case, step)
        m = run_child(argv, log, timeout=session.timeout, max_rss_kb=session.max_rss_kb, **kwargs)
        return m, log

    def record(step: str, m: Measure, log: Path, ok: bool = True, **extra) -> bool:
        """Record the step; False (and its error recorded) when it failed."""
        r = {**common, "step": step, "wall_s": m.wall_s, "peak_rss_kb": m.peak_rss_kb}
        if not ok or (m.returncode != 0 and not m.stopped):
            error = (
                "timed out"
                if m.timed_out
                else f"stopped past {gb(session.max_rss_kb)}"
                if m.over_memory
                else f"exit status {m.returncode}"
            )
            records.append({**r, "error": error})
            print(f"  {step:<12} FAILED ({error}); {log.with_suffix('.err')} ends:")
            print("    " + tail(log.with_suffix(".err"), 8).replace("\n", "\n    "), flush=True)
            return False
        records.append({**r, **extra})
        print(
            f"  {step:<12} {m.wall_s:8.1f} s {gb(m.peak_rss_kb):>8}"
            + "".join(f"  {k}={v}" for k, v in extra.items() if not k.endswith("_kb")),
            flush=True,
        )
        return True

    cli = session.cli
    overrides = [f"{k}={v}" for k, v in TRAIN_SETTINGS.items()]
    train = [cli, "train", "--no-progress", "data.source=imagefolder", f"data.root={root}"]
    train += overrides
    m, log = run("train", [*train, f"out={run_dir}"])
    if not record(
        "train",
        m,
        log,
        **train_phases(m, run_dir),
        confusion_csv_bytes=tree_bytes(run_dir / "confusion.csv")[0],
        confusion_png_bytes=tree_bytes(run_dir / "confusion.png")[0],
    ):
        return records  # nothing else has a model to run

    if session.second_start:  # stopped as soon as its training starts
        again = out / "run-again"
        m, log = run("train_again", [*train, f"out={again}"], until=lambda s: s.children > 0)
        first = next((s for s in m.samples if s.children), None)
        ready = {"startup_s": round(first.t, 2), "startup_rss_kb": first.hwm_kb} if first else {}
        record("train_again", m, log, ok=bool(ready), **ready)
        shutil.rmtree(again, ignore_errors=True)

    if "eval" in steps:
        m, log = run("eval", [cli, "eval", str(run_dir), "--format", "json", "--no-progress"])
        try:
            top1 = json.loads(log.with_suffix(".out").read_text()).get("top1")
        except (ValueError, AttributeError):
            top1 = None
        record("eval", m, log, top1=top1)

    if "predict" in steps:
        csv_out = out / "predict.csv"
        argv = [cli, "predict", str(run_dir), str(root / "test"), "--top-k", "5"]
        m, log = run("predict", [*argv, "--format", "csv"], stdout=csv_out)
        with csv_out.open("rb") as f:
            lines = sum(1 for _ in f)
        record("predict", m, log, csv_lines=lines, csv_bytes=csv_out.stat().st_size)

    if "compare" in steps:
        report = out / "compare"
        m, log = run(
            "compare", [cli, "compare", str(run_dir), "--out", str(report), "--no-progress"]
        )
        cache, files = tree_bytes(report / "cache")
        record("compare", m, log, cache_bytes=cache, cache_files=files)

    if "serve" in steps:
        port = free_port()
        ready = {}

        def answered(s: Sample) -> bool:
            if health(port):
                ready.update(ready_s=round(s.t, 2), ready_rss_kb=s.hwm_kb)
                return True
            return False

        argv = [cli, "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port)]
        m, log = run("serve", argv, until=answered)
        record("serve", m, log, ok=bool(ready), **ready)

    if not session.keep:
        shutil.rmtree(out, ignore_errors=True)
    return records


def floor(session: Session) -> Measure:
    """A process that only imports torch, as every command does: the RSS and time no size
    changes (the slopes are of what is above it)."""
    code = "import torch"
    log = session.work / "logs" / session.run_id / "floor.log"
    m = run_child([sys.executable, "-c", code], log, timeout=600)
    if m.returncode != 0:
        raise SystemExit(f"scale.py: the import floor failed:\n{tail(log.with_suffix('.err'))}")
    return m


# ----------------------------------------------------------------------------- tables


GB = 1e9


def gb(kb: float) -> str:
    return f"{kb * 1024 / GB:.2f} GB"


def secs(s: float) -> str:
    return f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x) over the points with y > 0 (None: < 2)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def newest(records: list[dict]) -> dict[tuple, dict]:
    """The newest scale record per (axis, classes, train images, test images, step)."""
    out: dict[tuple, dict] = {}
    for r in records:  # oldest first
        if r.get("kind") == "scale":
            key = (r["axis"], r["classes"], r["train_images"], r["test_images"], r["step"])
            out[key] = r
    return out


# (label, cell, series for the slope: [(name, value, subtract the floor's)])
Row = tuple[str, Callable[[dict], str], list[tuple[str, str, str | None]]]


def _get(cell: dict, step: str, key: str):
    return cell.get(step, {}).get(key)


def _pair(cell, step, wall="wall_s", rss="peak_rss_kb") -> str:
    if _get(cell, step, "error"):
        return f"failed ({_get(cell, step, 'error')} after {secs(cell[step]['wall_s'])})"
    w, r = _get(cell, step, wall), _get(cell, step, rss)
    if w is None:
        return ""
    return secs(w) + (f" / {gb(r)}" if r is not None else "")


def _end(cell) -> str:
    t = cell.get("train", {})
    if "end_s" not in t:
        return ""
    parts = [t.get(k) for k in ("test_pass_s", "after_pass_s", "model_save_s")]
    split = " (" + " + ".join(secs(p) for p in parts) + ")" if None not in parts else ""
    added = f" / +{gb(t['end_rss_added_kb'])}" if "end_rss_added_kb" in t else ""
    return secs(t["end_s"]) + split + added


def _confusion(cell) -> str:
    t = cell.get("train", {})
    if "confusion_csv_bytes" not in t:
        return ""
    return f"{size_text(t['confusion_csv_bytes'])} / {size_text(t.get('confusion_png_bytes', 0))}"


def _compare(cell) -> str:
    text = _pair(cell, "compare")
    cache = _get(cell, "compare", "cache_bytes")
    return text + (f" / {size_text(cache)}" if text and cache is not None else "")


ROWS: list[Row] = [
    (
        "`train`: wall / peak RSS",
        lambda c: _pair(c, "train"),
        [("wall", "train.wall_s", "wall"), ("RSS", "train.peak_rss_kb", "rss")],
    ),
    (
        "of which start-up (to its first training batch): wall / RSS then",
        lambda c: _pair(c, "train", "startup_s", "startup_rss_kb"),
        [("wall", "train.startup_s", "wall"), ("RSS", "train.startup_rss_kb", "rss")],
    ),
    (
        "of which the training: wall / main process's peak RSS",
        lambda c: _pair(c, "train", "training_s", "training_rss_kb"),
        [("wall", "train.training_s", None), ("RSS", "train.training_rss_kb", "rss")],
    ),
    (
        "end of the run (test pass + metrics and confusion files after it + model): "
        "wall / RSS added over the training",
        _end,
        [("wall", "train.end_s", None), ("RSS", "train.end_rss_added_kb", None)],
    ),
    ("confusion.csv / confusion.png", _confusion, [("csv", "train.confusion_csv_bytes", None)]),
    (
        "`train` again on the unchanged folder: start-up / RSS then",
        lambda c: _pair(c, "train_again", "startup_s", "startup_rss_kb"),
        [("wall", "train_again.startup_s", "wall")],
    ),
    (
        "`eval --format json`: wall / peak RSS",
        lambda c: _pair(c, "eval"),
        [("wall", "eval.wall_s", "wall"), ("RSS", "eval.peak_rss_kb", "rss")],
    ),
    (
        "`predict --top-k 5 --format csv`: wall / peak RSS",
        lambda c: _pair(c, "predict"),
        [("wall", "predict.wall_s", "wall"), ("RSS", "predict.peak_rss_kb", "rss")],
    ),
    (
        "`compare RUN`: wall / peak RSS / cache",
        _compare,
        [
            ("wall", "compare.wall_s", "wall"),
            ("RSS", "compare.peak_rss_kb", "rss"),
            ("cache", "compare.cache_bytes", None),
        ],
    ),
    (
        "`serve` start-up: until /health answers / RSS then",
        lambda c: _pair(c, "serve", "ready_s", "ready_rss_kb"),
        [("wall", "serve.ready_s", "wall"), ("RSS", "serve.ready_rss_kb", "rss")],
    ),
]


def _slopes(columns: list[tuple[int, dict]], series) -> str:
    parts = []
    for name, path, minus in series:
        step, key = path.split(".")
        points = []
        for size, cell in columns:
            r = cell.get(step)
            if r is None or r.get(key) is None:
                continue
            value = r[key]
            if minus == "wall":
                value -= r.get("floor_wall_s", 0)
            elif minus == "rss":
                value -= r.get("floor_rss_kb", 0)
            points.append((size, value))
        s = slope(points)
        if s is not None:
            parts.append(f"{name} {s:.2f}")
    return ", ".join(parts)


def axis_table(axis: str, latest: dict[tuple, dict]) -> tuple[str, list[str]] | None:
    """One axis's table (quantities x sizes, and the slopes) and the commands that made it."""
    cells: dict[tuple, dict] = {}
    for (a, classes, train, test, step), r in latest.items():
        if a == axis:
            cells.setdefault((classes, train, test), {})[step] = r
    if not cells:
        return None
    cases = sorted(cells, key=lambda k: (k[2], k[0]) if axis == "images" else (k[0], k[2]))
    if axis == "images":
        header = [f"{cases[0][0]:,} classes"] + [f"{k[2]:,} test images" for k in cases]
        sizes = [k[2] for k in cases]
    elif axis == "classes":
        header = [""] + [f"{k[0]:,} classes" for k in cases]
        sizes = [k[0] for k in cases]
    else:
        header = [""] + [f"{k[0]:,} classes x {k[2]:,} test images" for k in cases]
        sizes = [k[0] * k[2] for k in cases]
    columns = list(zip(sizes, (cells[k] for k in cases), strict=True))
    rows = []
    for label, cell, series in ROWS:
        values = [cell(c) for _, c in columns]
        if any(values):
            rows.append([label, *values] + ([_slopes(columns, series)] if len(cases) > 1 else []))

    def when(c: dict) -> str:
        stamps = sorted({(r.get("recorded", "")[:10], r.get("code", "")) for r in c.values()})
        return "; ".join(f"{d} `{code}`" for d, code in stamps)

    rows.append(["measured (date, code)", *[when(c) for _, c in columns]])
    if len(cases) > 1:
        rows[-1].append("")
        header.append("log-log slope, above the import floor")
    made_by = sorted(
        {(r.get("command", ""), r.get("machine", "")) for c in cells.values() for r in c.values()}
    )
    return markdown_table(header, rows), made_by


def headline_checks(latest: dict[tuple, dict]) -> list[str]:
    """Issue 25's targets, each with its figures (where the records have them)."""

    def cell(axis: str, classes: int, test: int) -> dict[str, dict]:
        return {k[4]: r for k, r in latest.items() if (k[0], k[1], k[3]) == (axis, classes, test)}

    big = cell("headline", 10_000, 100_000)
    small = cell("images", 100, 100_000)
    # The end-of-train target is read where its table measured it: 10,000 classes, one
    # test image a class. At 100,000 test images the test pass (a forward pass over them)
    # dominates; the headline line below gives its parts.
    ten_k = cell("classes", 10_000, 10_000)
    few, many = cell("images", 100, 1_000), cell("images", 100, 100_000)
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def failed(*records: dict) -> str:
        errors = [f"`{r['step']}` failed: {r['error']}" for r in records if r.get("error")]
        return "; ".join(errors)

    if "eval" in big and "eval" in small:
        a, b = big["eval"], small["eval"]
        d = (a["peak_rss_kb"] - b["peak_rss_kb"]) * 1024 / GB
        lines.append(
            "- `eval` peak RSS at 10,000 classes within 1.5 GB of 100 classes (100,000 test "
            "images both): "
            + (
                failed(a, b) + ": **not met**"
                if failed(a, b)
                else f"{gb(a['peak_rss_kb'])} against {gb(b['peak_rss_kb'])}, {d:+.2f} GB: "
                f"{verdict(d <= 1.5)}"
            )
            + "."
        )
    if "compare" in big and "eval" in big:
        a, b = big["compare"], big["eval"]
        x = a["wall_s"] / b["wall_s"]
        lines.append(
            "- `compare` of one run within 3x `eval`'s wall time: "
            + (
                failed(a, b) + ": **not met**"
                if failed(a, b)
                else f"{secs(a['wall_s'])} against {secs(b['wall_s'])}, {x:.1f}x: {verdict(x <= 3)}"
            )
            + "."
        )
    t = ten_k.get("train", {})
    if "end_s" in t and "end_rss_added_kb" in t:
        added = t["end_rss_added_kb"] * 1024 / GB
        lines.append(
            f"- the end of `train` at 10,000 classes ({t['test_images']:,} test images) under "
            f"60 s and 1 GB over its training: {secs(t['end_s'])}, {added:+.2f} GB: "
            f"{verdict(t['end_s'] < 60 and added < 1)}."
        )
    h = big.get("train", {})
    if "after_pass_s" in h and "end_rss_added_kb" in h:
        lines.append(
            "- the end of `train` at 10,000 classes x 100,000 test images: the test pass "
            f"{secs(h['test_pass_s'])} (the model over every test image), then metrics and "
            f"confusion files {secs(h['after_pass_s'])}, then the model {secs(h['model_save_s'])}; "
            f"{h['end_rss_added_kb'] * 1024 / GB:+.2f} GB over the training."
        )
    t = h if "confusion_csv_bytes" in h else t
    if "confusion_csv_bytes" in t:
        total = t["confusion_csv_bytes"] + t.get("confusion_png_bytes", 0)
        lines.append(
            f"- confusion outputs at 10,000 classes ({t['test_images']:,} test images) under "
            f"20 MB: {size_text(total)}: "
            f"{verdict(total < 20e6)}."
        )
    if "predict" in few and "predict" in many and not failed(few["predict"], many["predict"]):
        a, b = few["predict"]["peak_rss_kb"], many["predict"]["peak_rss_kb"]
        lines.append(
            f"- `predict` RSS flat from 1,000 to 100,000 images: {gb(a)} to {gb(b)} "
            f"({(b - a) * 1024 / GB:+.2f} GB)."
        )
    if "startup_s" in many.get("train_again", {}) and "startup_s" in many.get("train", {}):
        lines.append(
            "- the second training start on the unchanged 100,000-image folder: start-up "
            f"{secs(many['train_again']['startup_s'])} against "
            f"{secs(many['train']['startup_s'])} for the first."
        )
    return lines


def scale_section(records: list[dict]) -> list[str]:
    """The results page's scale tables, from the `scale` records (newest per cell)."""
    latest = newest(records)
    lines = [
        "### Scale: time and memory against classes and images",
        "",
    ]
    if not latest:
        return lines + [
            "No runs yet: `python benchmarks/scale.py --axis all --records` (issue 25's scaling "
            "benchmark), then `python benchmarks/results.py`.",
            "",
        ]
    settings = " ".join(f"{k}={v}" for k, v in TRAIN_SETTINGS.items())
    lines += [
        "Generated from `benchmarks/records/scale.jsonl` (`benchmarks/scale.py`). Tiny images "
        f"(32 px PNGs, {TRAIN_PER_CLASS} training images a class), `lookcloser train "
        f"{settings}`, then `eval`, `predict`, `compare` and `serve` on that run, each its own "
        "process: wall time and peak RSS (the largest process of its tree; GB = 10^9 bytes). "
        "What grows matters here, not the speed. Start-up ends when the first DataLoader "
        "worker starts; the training when last.ckpt is written. Slopes: least squares of "
        "log(value above a process that only imports torch) on log(size): "
        "0 is flat, 1 linear, 2 quadratic.",
        "",
    ]
    titles = {
        "classes": "Classes (1 test image a class)",
        "images": "Test images (100 classes)",
        "headline": "Headline: iNat's validation size in tiny",
    }
    for axis in ("classes", "images", "headline"):
        made = axis_table(axis, latest)
        if made is None:
            continue
        table, made_by = made
        lines += [f"**{titles[axis]}**", "", table, ""]
        lines += [f"Made by `{c}` on {where}." for c, where in made_by] + [""]
    checks = headline_checks(latest)
    if checks:
        lines += ["Issue 25's targets:", "", *checks, ""]
    return lines


# ----------------------------------------------------------------------------- main


def code_version() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return commit + ("+changes" if dirty else "")


def machine() -> str:
    """Where it ran, without importing torch here (the children do)."""
    gpu = ""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpu = done.stdout.splitlines()[0].split(" (")[0] if done.returncode == 0 else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {metadata.version('torch')}, " + (
        gpu or "no GPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--axis",
        nargs="+",
        default=["classes"],
        choices=["classes", "images", "headline", "all"],
        help="which cases (default: classes)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        metavar="N|AXIS=N",
        help="only these sizes: classes (classes axis) or test images (images axis); "
        "1k = 1000; AXIS=N limits one axis (default: the axis's three)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
        help="what to measure after `train` (which always runs: the rest needs its model)",
    )
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="sets, runs and logs")
    parser.add_argument("--out", type=Path, help="write this session's raw records as JSON")
    parser.add_argument(
        "--records",
        action="store_true",
        help=f"append the records to {RECORDS.relative_to(ROOT)}/scale.jsonl (the results page)",
    )
    parser.add_argument("--make-only", action="store_true", help="make the sets, measure nothing")
    parser.add_argument(
        "--no-second-start",
        action="store_true",
        help="skip the second `train` start on the unchanged folder",
    )
    parser.add_argument("--keep", action="store_true", help="keep runs and reports")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="image writers")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a command may take")
    parser.add_argument(
        "--max-rss",
        type=float,
        default=16,
        help="GB a command's main process may hold before it is stopped (0: no limit)",
    )
    parser.add_argument(
        "--src",
        type=Path,
        help="children import lookcloser from DIR/lookcloser first (PYTHONPATH): measure "
        "another version, e.g. `git archive HEAD src | tar -x -C /tmp/head` then "
        "--src /tmp/head/src",
    )
    parser.add_argument("--code", help="what the records call the code (default: git commit)")
    parser.add_argument(
        "--cli",
        default=str(Path(sys.executable).with_name("lookcloser")),
        help="the lookcloser command (default: beside this Python)",
    )
    args = parser.parse_args()

    work = args.work.resolve()
    if work == ROOT or ROOT in work.parents:
        raise SystemExit(f"--work {work}: inside the repository; choose a folder outside it")
    out_file = args.out.resolve() if args.out else None
    code = args.code or code_version()
    if args.src is not None:
        src = args.src.resolve()
        if not (src / "lookcloser" / "__init__.py").exists():
            raise SystemExit(f"--src {src}: no lookcloser package there")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(src), os.environ.get("PYTHONPATH")) if p
        )
        code = args.code or f"src {src}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the children's working folder: nothing they write lands in the repo
    if not args.make_only and not Path(args.cli).exists() and not shutil.which(args.cli):
        raise SystemExit(f"--cli {args.cli}: no such command (install the package in the venv)")
    cases = select_cases(args.axis, args.sizes)
    if not cases:
        raise SystemExit("no case selected: check --axis and --sizes")

    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # The command that remakes the records (without where this run put its own copy).
    argv = sys.argv[1:]
    if "--out" in argv:
        del argv[argv.index("--out") : argv.index("--out") + 2]
    argv = [a for a in argv if not a.startswith("--out=")]
    command = "python benchmarks/scale.py " + shlex.join(argv)
    session = Session(
        args.cli,
        work,
        run_id,
        args.timeout,
        int(args.max_rss * GB / 1024),
        base={},
        keep=args.keep,
        second_start=not args.no_second_start,
    )
    records: list[dict] = []
    if not args.make_only:
        m = floor(session)
        print(f"import floor: {m.wall_s:.1f} s, {gb(m.peak_rss_kb)}", flush=True)
        session.base = {
            "kind": "scale",
            "run": run_id,
            "code": code,
            "machine": machine(),
            "settings": dict(TRAIN_SETTINGS),
            "floor_wall_s": m.wall_s,
            "floor_rss_kb": m.peak_rss_kb,
            "command": command,
            "script": "scale.py",
        }
    for case in cases:
        root = work / "sets" / case.name
        info = make_set(root, case, args.jobs)
        made = info["made_s"]
        print(
            f"{case.axis}: {case.classes:,} classes, {case.train_images:,} train + "
            f"{case.test_images:,} test images in {root} "
            + (
                f"(made in {made:.1f} s, {1e3 * made / info['images']:.2f} ms an image)"
                if made is not None
                else "(reused)"
            ),
            flush=True,
        )
        if args.make_only:
            continue
        session.base["set_made_now"] = made is not None
        case_records = measure_case(session, case, root, args.steps)
        records += case_records
        if out_file:  # after every case: a later failure keeps what was measured
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(records, indent=1) + "\n")
        if args.records:
            append_records("scale", case_records)
    if records:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print()
        print("\n".join(scale_section([{**r, "recorded": now} for r in records])))


if __name__ == "__main__":
    main()
