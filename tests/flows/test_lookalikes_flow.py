"""Look-alikes through the real CLI on a model the CLI trained: embed, gallery build, predict
with neighbours and the open-set answer, explain's look-alikes figure, enrollment and the
enrolled model through predict / eval / ONNX, and the web page showing neighbours in headless
Chromium (skipped without it, as tests/flows/test_serve_browser.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from flowkit import SRC, run_cli

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None
)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def model(tmp_path_factory, trained_model) -> Path:
    """A copy of the trained model (its gallery must not reach the other flows' model)."""
    copy = tmp_path_factory.mktemp("lookalikes") / "model"
    shutil.copytree(trained_model, copy)
    return copy


@pytest.fixture(scope="module")
def with_gallery(model, synthetic_root) -> Path:
    result = run_cli("gallery", "build", str(model), str(synthetic_root))
    assert result.stdout.strip().splitlines()[-1] == str(model / "gallery")
    return model


def test_embed_writes_parquet_and_npy_and_names_bad_inputs(model, synthetic_root, tmp_path):
    from lookcloser.lookalikes.embed import read_embeddings

    test = synthetic_root / "test"
    images = sorted(test.rglob("*.png"))
    run_cli("embed", str(model), str(test), "--out", str(tmp_path / "e.parquet"))
    emb, rows = read_embeddings(tmp_path / "e.parquet")
    assert emb.shape[0] == len(images) == len(rows)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    out = run_cli("embed", str(model), str(test), "--out", str(tmp_path / "e.npy"))
    assert "e.csv" in out.stdout
    emb2, rows2 = read_embeddings(tmp_path / "e.npy")
    assert np.allclose(emb, emb2, atol=1e-6) and [r["path"] for r in rows2] == [
        str(p) for p in images
    ]

    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    shutil.copy(images[0], bad / "good.png")
    failed = run_cli("embed", str(model), str(bad), "--out", str(tmp_path / "b.npy"), check=False)
    assert failed.returncode == 2 and "broken.jpg" in failed.stderr
    assert "--on-bad-image skip" in failed.stderr and not (tmp_path / "b.npy").exists()
    skipped = run_cli(
        "embed", str(model), str(bad), "--out", str(tmp_path / "b.npy"), "--on-bad-image", "skip"
    )
    assert "skipped:" in skipped.stderr and "wrote 1 embeddings" in skipped.stdout
    (tmp_path / "empty").mkdir()
    empty = run_cli("embed", str(model), str(tmp_path / "empty"), "--out", "x.npy", check=False)
    assert empty.returncode == 2 and "empty: no image files" in empty.stderr


def test_predict_and_explain_show_neighbours_and_unknown(with_gallery, synthetic_root, tmp_path):
    model = with_gallery
    image = sorted((synthetic_root / "test").rglob("*.png"))[0]
    out = run_cli(
        "predict",
        str(model),
        str(image),
        "--neighbours",
        "2",
        "--reject-unknown",
        "--format",
        "json",
    )
    (answer,) = json.loads(out.stdout)
    groups = answer["neighbours"]
    assert [g["class"] for g in groups] == [t["class"] for t in answer["top"][:2]]
    for group in groups:
        assert len(group["neighbours"]) == 2
        for n in group["neighbours"]:
            assert n["class"] == group["class"] and (synthetic_root / n["path"]).is_file()
    assert isinstance(answer["unknown"], bool)
    assert answer["answer"] == ("unknown" if answer["unknown"] else answer["top"][0]["class"])
    # a model directory without a gallery works as before, and says how to build one if asked
    plain = run_cli("predict", str(model), str(image), "--format", "json")
    assert set(json.loads(plain.stdout)[0]) == {"path", "top"}
    missing = run_cli(
        "predict", str(model), str(image), "--neighbours", "1", "--gallery", "x", check=False
    )
    assert missing.returncode == 2 and "x: no gallery.json" in missing.stderr

    shown = run_cli("explain", str(model), str(image), "--out", str(tmp_path / "x.png"))
    lines = shown.stdout.splitlines()
    assert lines[0] == str(tmp_path / "x.png") and lines[1] == str(tmp_path / "x-lookalikes.png")
    assert (tmp_path / "x-lookalikes.png").stat().st_size > 1000


def test_enroll_then_predict_eval_and_onnx(with_gallery, synthetic_root, tmp_path):
    from lookcloser.data.synthetic import generate

    model = with_gallery
    four = generate(tmp_path / "four", classes=4, per_class=4, test_per_class=2, size=64)
    new_class = tmp_path / "new"
    shutil.copytree(four / "train" / "c03_ring-cross-dot", new_class / "c03_ring-cross-dot")
    refused = run_cli(
        "enroll",
        str(model),
        "--class",
        "c00_dot-bar-triangle",
        str(new_class),
        "--out",
        str(tmp_path / "no"),
        check=False,
    )
    assert refused.returncode == 2 and "already has a class of that name" in refused.stderr
    before = (model / "model.safetensors").read_bytes()
    out = run_cli("enroll", str(model), "--folder", str(new_class), "--out", str(tmp_path / "m4"))
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "m4")
    assert (model / "model.safetensors").read_bytes() == before
    record = json.loads((tmp_path / "m4" / "model.json").read_text())
    assert record["classes"] == sorted(p.name for p in (four / "train").iterdir())
    assert record["enrolled"]["classes"] == [{"name": "c03_ring-cross-dot", "images": 4}]

    predicted = run_cli(
        "predict",
        str(tmp_path / "m4"),
        str(four / "test" / "c03_ring-cross-dot"),
        "--format",
        "json",
    )
    assert all(len(p["top"]) == 4 for p in json.loads(predicted.stdout))
    metrics = json.loads(
        run_cli("eval", str(tmp_path / "m4"), f"data.root={four}", "--format", "json").stdout
    )
    assert metrics["images"] == 8 and 0 <= metrics["top1"] <= 1
    exported = run_cli("export", str(tmp_path / "m4"), "--embedding")
    diffs = [float(x) for x in exported.stdout.rsplit("logits ", 1)[1].split(", embedding ")]
    assert diffs[0] < 1e-3 and diffs[1] < 1e-4
    # the old gallery refuses the enrolled model (other weights, other classes)
    other = run_cli(
        "predict",
        str(tmp_path / "m4"),
        str(four / "test"),
        "--neighbours",
        "1",
        "--gallery",
        str(model / "gallery"),
        check=False,
    )
    assert other.returncode == 2 and "built for another model" in other.stderr
    # its own gallery: the old one carried over, with the new class's images as references
    assert "gallery" in out.stdout and (tmp_path / "m4" / "gallery" / "gallery.json").is_file()
    answers = json.loads(
        run_cli(
            "predict",
            str(tmp_path / "m4"),
            str(four / "test" / "c03_ring-cross-dot"),
            "--neighbours",
            "2",
            "--format",
            "json",
        ).stdout
    )
    assert all(len(a["neighbours"]) == 2 for a in answers)
    gallery = json.loads((tmp_path / "m4" / "gallery" / "gallery.json").read_text())
    assert gallery["per_class"]["c03_ring-cross-dot"] == 4
    enrolled = [p for p in gallery["paths"] if Path(p).parent.name == "c03_ring-cross-dot"]
    assert len(enrolled) == 4 and all(  # relative to the common folder of both image roots
        (Path(gallery["data_root"]) / p).parent == new_class / "c03_ring-cross-dot"
        for p in enrolled
    )


# ---- the page, in headless Chromium ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_page_shows_neighbours(with_gallery, synthetic_root, tmp_path):
    """The page shows, under the answer, thumbnails of the predicted class's and the
    runner-up's nearest references with their class and similarity (the API's answer)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lookcloser.cli",
            "serve",
            str(with_gallery),
            "--port",
            str(port),
            "--neighbours",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1000"):
        options.add_argument(arg)
    driver = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {process.stdout.read()}") from None
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        image = sorted((synthetic_root / "test").rglob("*.png"))[0]
        driver.find_element(By.ID, "file").send_keys(str(image))
        loaded = (
            "return [...document.querySelectorAll('#refrows img')]"
            ".filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')).length"
        )
        wait.until(lambda d: d.execute_script(loaded) == 4)
        assert driver.find_element(By.ID, "lookalikes").is_displayed()
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#refrows .label")]
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#top .bar .name")]
        assert labels == [f"predicted: {names[0]}", f"runner-up: {names[1]}"]
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#refrows figcaption")]
        assert len(captions) == 4
        assert all(c.splitlines()[1].startswith("similarity ") for c in captions)
        assert [c.splitlines()[0] for c in captions] == [names[0]] * 2 + [names[1]] * 2
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert driver.save_screenshot(str(tmp_path / "lookalikes.png"))
    finally:
        if driver is not None:
            driver.quit()
        process.terminate()
        process.wait(30)
