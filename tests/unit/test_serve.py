"""`lookcloser serve`: the REST API on a tiny model, through FastAPI's TestClient (no socket)."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from meta_method import META_METHOD
from PIL import Image

from lookcloser.cli import main
from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import ConfigError, ModelDirError
from lookcloser.evaluation import CONFIDENCE_KEY
from lookcloser.export.onnx import export_onnx
from lookcloser.methods import build_method
from lookcloser.predictor import Predictor
from lookcloser.serve.app import ServeSettings, create_app
from lookcloser.serve.backends import DEFAULT_UNSURE_BELOW, TorchBackend, load_backend
from lookcloser.training import save_run_model

LOCAL = "http://127.0.0.1"  # the server answers only to its own names (the Host check)
CLASSES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
SIZE = 64
VAL_THRESHOLD = 0.31


def _model_dir(path, *overrides: str, metrics: dict | None = None):
    torch.manual_seed(0)
    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            "data.crop_pct=0.875",
            *overrides,
        ],
    )
    method = build_method(cfg, len(CLASSES)).eval()
    with torch.no_grad():  # spread the untrained logits so the classes differ
        for p in method.parameters():
            if p.dim() == 2:
                p.normal_(0, 1)
    save_run_model(path, method, TrainingData(CLASSES), cfg, metrics or {}, "bicubic")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Baseline model directory whose val metrics carry the unsure threshold."""
    metrics = {"val": {"images": 40, "top1": 0.8, CONFIDENCE_KEY: VAL_THRESHOLD}}
    return _model_dir(tmp_path_factory.mktemp("model"), metrics=metrics)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.load(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four PNG files of different sizes and content."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 70), (64, 64), (120, 90), (50, 100)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= i + 2  # some structure, different per image
        path = root / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def client(predictor):
    with TestClient(create_app(predictor), base_url=LOCAL) as client:
        yield client


def _post(client, path, image_path, **kwargs):
    with open(image_path, "rb") as f:
        return client.post(path, files={"file": (image_path.name, f, "image/png")}, **kwargs)


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _probs(answer: dict) -> dict[str, float]:
    return {t["class"]: t["prob"] for t in answer["top"]}


# ---- predict ------------------------------------------------------------------------------------
def test_predict_multipart_and_json_agree_with_predictor(client, predictor, images):
    """Both request forms answer the Predictor's own top-k for the same file."""
    expected = predictor.predict(images, top_k=3)
    for path, want in zip(images, expected, strict=True):
        multipart = _post(client, "/predict?k=3", path)
        as_json = client.post("/predict", params={"k": 3}, json={"image": _b64(path)})
        assert multipart.status_code == 200 and as_json.status_code == 200, multipart.text
        for answer in (multipart.json(), as_json.json()):
            assert [t["class"] for t in answer["top"]] == want.classes
            assert [t["index"] for t in answer["top"]] == want.indices
            np.testing.assert_allclose([t["prob"] for t in answer["top"]], want.probs, atol=1e-5)
    # A data: URL, as a browser's FileReader makes it, is accepted too.
    data_url = "data:image/png;base64," + _b64(images[0])
    answer = client.post("/predict", json={"image": data_url}).json()
    assert [t["class"] for t in answer["top"]][:3] == expected[0].classes


def test_predict_top_k_and_unsure_flag(predictor, images):
    """k sets how many classes come back (at most all); `unsure` compares the top probability
    with the threshold: the model's validation one by default, or --unsure-below."""
    with TestClient(create_app(predictor), base_url=LOCAL) as client:
        answer = _post(client, "/predict?k=2", images[0]).json()
        assert len(answer["top"]) == 2 and answer["unsure_below"] == VAL_THRESHOLD
        assert answer["unsure"] is (answer["top"][0]["prob"] < VAL_THRESHOLD)
        assert len(_post(client, "/predict?k=100", images[0]).json()["top"]) == len(CLASSES)
    for threshold, unsure in [(1.0, True), (0.0, False)]:
        settings = ServeSettings(unsure_below=threshold)
        with TestClient(create_app(predictor, settings), base_url=LOCAL) as client:
            answer = _post(client, "/predict", images[0]).json()
            assert answer["unsure"] is unsure and answer["unsure_below"] == threshold
            assert client.get("/model").json()["unsure_below"]["source"] == "--unsure-below"


def test_unsure_default_without_validation_metrics(tmp_path):
    """A model directory without validation metrics gets the documented default, and says so."""
    backend = TorchBackend(Predictor.load(_model_dir(tmp_path / "m", metrics={"test": {}})))
    value, source = backend.unsure_below()
    assert value == DEFAULT_UNSURE_BELOW and "default" in source and CONFIDENCE_KEY in source


def test_unsure_threshold_not_taken_from_a_tiny_val_split(tmp_path, predictor, images):
    """A val split too small to estimate the threshold sets none (training records why); the
    server uses the default floor and says why, in /model and in its start-up banner. A model
    directory from before the rule, with a threshold from 8 images, is treated the same."""
    from lookcloser.evaluation import CONFIDENCE_NOTE_KEY, compute_metrics, summary
    from lookcloser.serve.app import banner

    torch.manual_seed(0)
    val = summary(compute_metrics(torch.randn(8, 6), torch.arange(8) % 6, CLASSES, split="val"))
    assert val[CONFIDENCE_KEY] is None
    assert val[CONFIDENCE_NOTE_KEY].startswith("val split of 8 images: too small")
    old = {"images": 8, "top1": 0.25, CONFIDENCE_KEY: 1.0}  # recorded before the rule
    for n, recorded in enumerate([val, old]):
        served = Predictor.load(_model_dir(tmp_path / f"m{n}", metrics={"val": recorded}))
        with TestClient(create_app(served), base_url=LOCAL) as client:
            info = client.get("/model").json()["unsure_below"]
            assert info["value"] == DEFAULT_UNSURE_BELOW
            assert "val split of 8 images: too small to set an unsure threshold" in info["source"]
            answer = _post(client, "/predict", images[0]).json()
            assert answer["unsure_below"] == DEFAULT_UNSURE_BELOW
            assert answer["unsure"] is (answer["top"][0]["prob"] < DEFAULT_UNSURE_BELOW)
            text = banner(client.app)
        assert f"p < {DEFAULT_UNSURE_BELOW:.3f} (default" in text and "8 images" in text


def test_banner_is_readable_lines(predictor):
    """The start-up banner is one fact a line, not a Python dict; the token is never shown."""
    from lookcloser.serve.app import banner

    settings = ServeSettings(token="s3cret", unsure_below=0.4)
    text = banner(create_app(predictor, settings))
    lines = text.splitlines()
    assert lines[0].startswith("lookcloser serve: http://127.0.0.1:8000/ (torch backend, 6 classes")
    assert "  unsure below:  p < 0.400 (--unsure-below)" in lines
    assert any(line.startswith("  token:") and "required" in line for line in lines)
    assert "s3cret" not in text and "{" not in text and "'" not in text and "None" not in text
    assert any(line.startswith("  look-alikes:   none") for line in lines)


def test_favicon_is_served(client):
    """The page links an icon and the server has it: no 404 in the browser's console."""
    page = client.get("/").text
    assert '<link rel="icon" href="favicon.svg"' in page
    for path in ("/favicon.svg", "/favicon.ico"):
        icon = client.get(path)
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert icon.text.startswith("<svg")


# ---- explain, model, health -----------------------------------------------------------------------
def test_explain_returns_png_for_each_map(client, predictor, images):
    """/explain answers a PNG heatmap overlay (the model's input view) for every listed map."""
    info = client.get("/model").json()
    assert info["maps"] and info["maps"][0] == "grad-cam"
    for name in info["maps"]:
        response = _post(client, "/explain", images[2], params={"map": name})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == "PNG" and picture.size == (SIZE, SIZE)
        assert response.headers["x-map"] == name
    expected = predictor.explain(images[2], map_name=info["maps"][0])
    assert response.headers["x-class"] == expected.class_name
    figure = _post(client, "/explain", images[2], params={"style": "figure"})
    assert Image.open(io.BytesIO(figure.content)).width > SIZE  # input, overlay and colour bar
    unknown = _post(client, "/explain", images[2], params={"map": "nope"})
    assert unknown.status_code == 422 and "nope" in unknown.json()["detail"]
    assert "grad-cam" in unknown.json()["detail"]
    wrong_class = _post(client, "/explain", images[2], params={"target": "omega"})
    assert wrong_class.status_code == 422 and "omega" in wrong_class.json()["detail"]


def test_model_and_health(client, model_dir):
    """/model describes the model and the server; /health reports liveness and load."""
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["method"] == "baseline"
    assert info["preprocessing"]["image_size"] == SIZE
    assert info["preprocessing"]["crop_pct"] == 0.875
    assert info["meta_keys"] == [] and info["backend"] == "torch"
    assert info["metrics"]["val"][CONFIDENCE_KEY] == VAL_THRESHOLD
    assert info["unsure_below"]["value"] == VAL_THRESHOLD
    assert "validation" in info["unsure_below"]["source"]
    assert info["batching"] == {"max_batch": 8, "max_wait_ms": 5.0}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0 and health["rss_mb"] > 0
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/model", "/health"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<title>lookcloser</title>" in page.text


# ---- bad input ------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (wrong) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _bad_requests(good_png: bytes) -> dict[str, tuple[dict, int, str]]:
    """name -> (request arguments, expected status, text the message must contain)."""
    return {
        "not an image": (
            {"files": {"file": ("notes.txt", b"hello, not an image", "text/plain")}},
            422,
            "not an image",
        ),
        "truncated image": (
            {"files": {"file": ("cut.png", good_png[: len(good_png) // 2], "image/png")}},
            422,
            "truncated",
        ),
        "huge dimensions": (
            {"files": {"file": ("bomb.png", _png_header(60_000, 60_000), "image/png")}},
            422,
            "pixels",
        ),
        "empty body": ({"content": b""}, 400, "empty request"),
        "empty file": ({"files": {"file": ("e.png", b"", "image/png")}}, 422, "empty file"),
        "wrong field": (
            {"files": {"image": ("a.png", good_png, "image/png")}},
            422,
            "field 'file'",
        ),
        "text in the file field": (
            {"files": {"x": ("x.png", good_png, "image/png")}, "data": {"file": "abc"}},
            422,
            "file upload",
        ),
        "wrong content type": (
            {"content": good_png, "headers": {"content-type": "image/png"}},
            415,
            "multipart/form-data",
        ),
        "bad base64": ({"json": {"image": "%%%not base64"}}, 422, "base64"),
        "bad JSON": (
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            422,
            "not valid JSON",
        ),
        "JSON without image": ({"json": {"picture": "abc"}}, 422, '"image"'),
        "meta not an object": (
            {"json": {"image": base64.b64encode(good_png).decode(), "meta": [1, 2]}},
            422,
            "meta",
        ),
        "meta not JSON": (
            {"files": {"file": ("a.png", good_png, "image/png")}, "data": {"meta": "{lat"}},
            422,
            "form field 'meta'",
        ),
        "two files": (
            {
                "files": [
                    ("file", ("a.png", good_png, "image/png")),
                    ("file", ("b.png", good_png, "image/png")),
                ]
            },
            400,
            "files",
        ),
    }


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(client, images):
    """Every bad request is answered 4xx with a message naming what was wrong; a good request
    after each one is still answered."""
    good_png = images[1].read_bytes()
    for name, (kwargs, status, text) in _bad_requests(good_png).items():
        response = client.post("/predict", **kwargs)
        assert response.status_code == status, (name, response.text)
        assert text in response.json()["detail"], (name, response.json())
        assert _post(client, "/predict", images[1]).status_code == 200, name
    bad_k = _post(client, "/predict?k=0", images[1])
    assert bad_k.status_code == 422 and bad_k.json()["detail"].startswith("k:")
    assert client.get("/health").json()["in_flight"] == 0


def test_pixel_limit_and_upload_limit(predictor, images):
    """--max-pixels refuses a real image over it (422); --max-upload-mb refuses larger bodies
    (413), whether they declare their length or arrive in chunks."""
    with TestClient(
        create_app(predictor, ServeSettings(max_pixels=64 * 64)), base_url=LOCAL
    ) as client:
        refused = _post(client, "/predict", images[2])  # 120 x 90
        assert refused.status_code == 422 and "120x90" in refused.json()["detail"]
        assert _post(client, "/predict", images[1]).status_code == 200  # 64 x 64
    small = Image.new("RGB", (40, 30), "olive")
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    with TestClient(
        create_app(predictor, ServeSettings(max_upload_mb=0.01)), base_url=LOCAL
    ) as client:
        payload = {"image": base64.b64encode(b"\0" * 20_000).decode()}
        declared = client.post("/predict", json=payload)
        assert declared.status_code == 413 and "limit" in declared.json()["detail"]

        def chunks():
            yield b'{"image": "'
            for _ in range(30):
                yield b"A" * 1000

        chunked = client.post(
            "/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413 and "10485 bytes" in chunked.json()["detail"]
        ok = client.post("/predict", files={"file": ("s.png", buffer.getvalue(), "image/png")})
        assert ok.status_code == 200


def test_bearer_token(predictor, images):
    """With --token, the model endpoints need it (401 without or wrong); /health stays open."""
    with TestClient(create_app(predictor, ServeSettings(token="s3cret")), base_url=LOCAL) as client:
        assert _post(client, "/predict", images[0]).status_code == 401
        wrong = _post(client, "/predict", images[0], headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/model").status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert _post(client, "/predict", images[0], headers=right).status_code == 200
        assert client.get("/model", headers=right).status_code == 200
        assert client.get("/health").status_code == 200


# ---- queue, timeout, batching ---------------------------------------------------------------------
class _GatedBackend(TorchBackend):
    """The torch backend, but each forward waits for `gate` (and says it has started)."""

    def __init__(self, predictor):
        super().__init__(predictor)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def probabilities(self, images, meta, meta_mask):
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        return super().probabilities(images, meta, meta_mask)


def test_queue_full_is_503_and_timeouts_are_503(predictor, images):
    """With --max-queue 1 and one request in the model, the next is refused 503 at once; a
    request the model does not answer within --timeout gets 503; the server then serves."""
    backend = _GatedBackend(predictor)
    settings = ServeSettings(max_queue=1, max_batch=1, timeout_s=5)
    with TestClient(create_app(backend, settings), base_url=LOCAL) as client:
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(r=_post(client, "/predict", images[0]))
        )
        thread.start()
        assert backend.entered.wait(10)
        busy = _post(client, "/predict", images[1])
        assert busy.status_code == 503 and "--max-queue" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "1"
        backend.gate.set()
        thread.join(10)
        assert first["r"].status_code == 200
        assert _post(client, "/predict", images[1]).status_code == 200
    backend = _GatedBackend(predictor)
    with TestClient(create_app(backend, ServeSettings(timeout_s=0.3)), base_url=LOCAL) as client:
        late = _post(client, "/predict", images[0])
        assert late.status_code == 503 and "did not answer within 0.3 s" in late.json()["detail"]
        backend.gate.set()
        assert _post(client, "/predict", images[0]).status_code == 200


def test_micro_batching_gives_the_unbatched_answers(predictor, images):
    """Concurrent requests are answered from one forward, with the same probabilities as the
    Predictor gives each image alone."""
    requests = [images[i % len(images)] for i in range(6)]
    expected = {p: _probs_of(predictor, p) for p in images}
    app = create_app(predictor, ServeSettings(max_batch=8, max_wait_ms=50))
    worker = app.state.worker
    with TestClient(app, base_url=LOCAL) as client:
        gate = threading.Event()
        worker.call(gate.wait)  # hold the worker until every request is queued
        answers: list = [None] * len(requests)

        def send(i: int) -> None:
            answers[i] = _post(client, "/predict?k=6", requests[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while worker._queue.qsize() < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(20)
    assert worker.forwards == 1 and worker.predicted == len(requests)
    for path, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200
        got = _probs(answer.json())
        for name, prob in expected[path].items():
            assert got[name] == pytest.approx(prob, abs=1e-5)


def _probs_of(predictor, path) -> dict[str, float]:
    (prediction,) = predictor.predict([path], top_k=len(CLASSES))
    return dict(zip(prediction.classes, prediction.probs, strict=True))


# ---- ONNX backend, metadata -----------------------------------------------------------------------
def test_onnx_backend_agrees_with_torch(model_dir, predictor, images, tmp_path):
    """--backend onnx answers the PyTorch probabilities (within 1e-4) from an exported graph;
    explain still works (it runs the PyTorch model); a missing graph is a clear error."""
    with pytest.raises(ModelDirError, match="lookcloser export"):
        load_backend(model_dir, "onnx", onnx_file=tmp_path / "none.onnx")
    onnx_file = export_onnx(predictor, tmp_path / "model.onnx")
    backend = load_backend(model_dir, "onnx", onnx_file=onnx_file)
    with TestClient(create_app(backend), base_url=LOCAL) as client:
        info = client.get("/model").json()
        assert info["backend"] == "onnx" and info["onnx_file"] == str(onnx_file)
        for path in images:
            got = _probs(_post(client, "/predict?k=6", path).json())
            for name, prob in _probs_of(predictor, path).items():
                assert got[name] == pytest.approx(prob, abs=1e-4)
        assert _post(client, "/explain", images[0]).headers["content-type"] == "image/png"
    with pytest.raises(ConfigError, match="--backend"):
        load_backend(model_dir, "tensorrt")


def test_metadata_from_json_and_multipart(tmp_path, images):
    """A model with meta_keys takes them from JSON `meta` or the multipart field `meta`, and
    answers as Predictor.predict(meta=...); a value that is not a number is a 422 naming it."""
    model = _model_dir(tmp_path / "meta", f"method.name={META_METHOD}", "data.meta_keys=[lat, lon]")
    predictor = Predictor.load(model)
    with torch.no_grad():  # make the metadata matter
        predictor.method.meta_head.weight.normal_(0, 3)
    meta = {"lat": 48.1, "lon": -2.5}
    (with_meta,) = predictor.predict([images[0]], top_k=len(CLASSES), meta=[meta])
    (only_lat,) = predictor.predict([images[0]], top_k=len(CLASSES), meta=[{"lat": 48.1}])
    assert with_meta.probs != only_lat.probs
    with TestClient(create_app(predictor), base_url=LOCAL) as client:
        assert client.get("/model").json()["meta_keys"] == ["lat", "lon"]
        as_json = client.post("/predict?k=6", json={"image": _b64(images[0]), "meta": meta})
        multipart = _post(client, "/predict?k=6", images[0], data={"meta": json.dumps(meta)})
        partial = client.post(
            "/predict?k=6", json={"image": _b64(images[0]), "meta": {"lat": 48.1}}
        )
        for answer, want in [(as_json, with_meta), (multipart, with_meta), (partial, only_lat)]:
            got = _probs(answer.json())
            for name, prob in zip(want.classes, want.probs, strict=True):
                assert got[name] == pytest.approx(prob, abs=1e-5)
        bad = client.post("/predict", json={"image": _b64(images[0]), "meta": {"lat": "north"}})
        assert bad.status_code == 422 and "'lat'" in bad.json()["detail"]


# ---- settings, CLI --------------------------------------------------------------------------------
def test_settings_are_range_checked():
    """Out-of-range options are refused naming the flag."""
    with pytest.raises(ConfigError, match="--max-batch"):
        ServeSettings(max_batch=0).check()
    with pytest.raises(ConfigError, match="--unsure-below"):
        ServeSettings(unsure_below=1.5).check()
    with pytest.raises(ConfigError, match="--token"):
        ServeSettings(token=" ").check()
    assert ServeSettings().host == "127.0.0.1"


def test_cli_serve_refuses_a_folder_without_a_model(tmp_path, capsys):
    """`lookcloser serve DIR` on a folder that is no model directory exits 2 with a message."""
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err


# ---- fuzzing the OpenAPI schema --------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(predictor):
    """Schemathesis requests made from the OpenAPI schema (its example, schema-valid and
    schema-invalid data; 10 of each kind per operation) get no 5xx, and every answer conforms
    to the schema (status codes, content types, bodies)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # Schemathesis's ASGI client calls the server "testserver": accepted like --allowed-host.
    app = create_app(predictor, ServeSettings(timeout_s=10, allowed_hosts=("testserver",)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, set[int]] = {}
    with TestClient(app):
        for result in schema.get_all_operations():
            operation = result.ok()
            kinds = [*schema.get_strategies_from_examples(operation)]
            kinds.append(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
            if operation.body or operation.query:
                kinds.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

            @given(case=st.one_of(*kinds))
            @settings(
                max_examples=10 * len(kinds),
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case):
                response = case.call()
                seen.setdefault(case.operation.label, set()).add(response.status_code)
                assert b"Traceback" not in response.content, response.content[-2000:]
                # A binary field cannot say "a decodable image": schema-valid bytes may be 422.
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            check()
    assert {"POST /predict", "POST /explain", "GET /model", "GET /health"} <= set(seen)
    assert all(code < 500 for codes in seen.values() for code in codes), seen
    assert 200 in seen["POST /predict"] and 422 in seen["POST /predict"]  # the example, and fuzz
