"""The web page of `lookcloser serve` in a real browser: Debian's headless Chromium, driven by
Selenium through Debian's chromedriver, against `lookcloser serve` on a loopback port.

The screenshot in docs/img/serve.png was taken by this test on another model and image:
LOOKCLOSER_SERVE_MODEL=DIR LOOKCLOSER_SERVE_IMAGE=FILE LOOKCLOSER_SERVE_SCREENSHOT=OUT.png
"""

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

import pytest
from flowkit import SRC
from PIL import Image

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None
)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(request):
    """`lookcloser serve MODEL` on a free loopback port; yields its base URL."""
    model = os.environ.get("LOOKCLOSER_SERVE_MODEL") or request.getfixturevalue("trained_model")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lookcloser.cli", "serve", str(model), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {process.stdout.read()}") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,760"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read below
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_top_classes_and_heatmap(server, browser, request, tmp_path):
    """Picking an image on the page shows its top classes with bars (the API's answer, in
    order) and the heatmap image from /explain; the screenshot is a real rendering."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = os.environ.get("LOOKCLOSER_SERVE_IMAGE")
    if not image:
        image = sorted(request.getfixturevalue("synthetic_root").glob("test/*/*.png"))[0]
    image = Path(image)
    with urllib.request.urlopen(f"{server}/model") as r:
        info = json.load(r)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: info["backbone"] in d.find_element(By.ID, "model").text)
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#map option")]
    assert options == info["maps"]

    browser.find_element(By.ID, "file").send_keys(str(image))
    expected = min(5, len(info["classes"]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top .bar")) == expected)
    heatmap_loaded = (
        "const i = document.getElementById('heatmap');"
        "return i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:');"
    )
    wait.until(lambda d: d.execute_script(heatmap_loaded))
    assert not browser.find_element(By.ID, "error").is_displayed()

    # The bars are the API's own answer for the same file, in order.
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top .bar .name")]
    boundary = "lookcloser-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"'
            f"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server}/predict?k={expected}",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request) as r:
        answer = json.load(r)
    assert names == [t["class"] for t in answer["top"]]
    size = info["preprocessing"]["image_size"]
    natural = browser.execute_script(
        "const i = document.getElementById('heatmap'); return [i.naturalWidth, i.naturalHeight];"
    )
    assert natural == [size, size]
    caption = browser.find_element(By.ID, "heatcaption").text
    assert info["maps"][0] in caption and answer["top"][0]["class"] in caption
    # The threshold line says where the threshold came from (the tiny model's val split is too
    # small to set one: the default, and why).
    threshold = browser.find_element(By.ID, "threshold").text
    assert f"{info['unsure_below']['value']:.3f}" in threshold
    if info["unsure_below"]["source"].startswith("default"):
        assert info["unsure_below"]["source"] in threshold
    # Nothing failed to load, the favicon included (no 404 in the console).
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    out = Path(os.environ.get("LOOKCLOSER_SERVE_SCREENSHOT", tmp_path / "serve.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out))
    with Image.open(out) as shot:
        assert shot.size[0] >= 800 and shot.size[1] >= 500
        assert len(shot.convert("RGB").getcolors(1 << 20) or []) > 50  # not a blank page
