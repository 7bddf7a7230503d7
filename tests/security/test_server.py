"""`lookcloser serve` under attack: deeply nested JSON, clients that send their bodies slowly,
DNS rebinding (a foreign Host header), an exposed server without a token, and a fuzz of the
inputs a client controls. Complements tests/unit/test_serve.py (schema-driven fuzzing)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meta_method import META_METHOD
from PIL import Image

from lookcloser.cli import main
from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.predictor import Predictor
from lookcloser.serve import app as serve_app
from lookcloser.serve.app import ServeSettings, create_app
from lookcloser.serve.backends import TorchBackend
from lookcloser.training import save_run_model

LOCAL = "http://127.0.0.1"
SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory taking two metadata keys, so meta reaches the model."""
    torch.manual_seed(0)
    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            f"method.name={META_METHOD}",
            "data.meta_keys=[lat, day_of_year]",
        ],
    )
    path = tmp_path_factory.mktemp("model")
    save_run_model(
        path, build_method(cfg, 3).eval(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic"
    )
    return path


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.load(model_dir)


def _png(size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = _png()


def _client(app, base_url: str = LOCAL) -> TestClient:
    # Server errors come back as responses (500), as a real client would see them.
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


# ---- (a) nested JSON ---------------------------------------------------------------------------
def test_deeply_nested_meta_is_422_not_500(predictor):
    """`meta` nested 100,000 levels deep (JSON body or multipart field), or a whole body nested
    so, answers 422 naming the problem; so do numbers too large for a float."""
    deep = "[" * 100_000 + "]" * 100_000
    image = base64.b64encode(GOOD).decode()
    with _client(create_app(predictor)) as client:
        as_json = client.post(
            "/predict",
            content=f'{{"image": "{image}", "meta": {{"lat": {deep}}}}}',
            headers={"content-type": "application/json"},
        )
        form = client.post(
            "/predict",
            files={"file": ("a.png", GOOD, "image/png")},
            data={"meta": '{"lat": ' + deep + "}"},
        )
        body = client.post("/explain", content=deep, headers={"content-type": "application/json"})
        for response in (as_json, form, body):
            assert response.status_code == 422, response.text[:300]
            assert "nested too deeply" in response.json()["detail"]
        # Nested below the parser's limit: still refused, naming the key.
        shallow = client.post("/predict", json={"image": image, "meta": {"lat": [[[1.0]]]}})
        assert shallow.status_code == 422 and "'lat'" in shallow.json()["detail"]
        for number in ("1" * 5_000, "1" * 4_000):  # past Python's int-parsing limit; past float
            huge = client.post(
                "/predict",
                content=f'{{"image": "{image}", "meta": {{"lat": {number}}}}}',
                headers={"content-type": "application/json"},
            )
            assert huge.status_code == 422, huge.text[:300]
        assert client.post("/predict", json={"image": image, "meta": {"lat": 4}}).status_code == 200


# ---- (b) slow bodies -----------------------------------------------------------------------------
@contextlib.contextmanager
def live_server(app):
    """The app on a real uvicorn socket (127.0.0.1, a free port), in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def _request(port: int, body: bytes, path: str = "/predict") -> tuple[int, bytes]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        return _response(sock)


def _response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def test_slow_bodies_do_not_hold_the_queue(predictor):
    """Six clients send their bodies at about 2 bytes/s to a server admitting 2 requests at
    a time: a normal request meanwhile is answered 200 (the slow ones hold no place in the
    queue), and each slow client is answered 408 once --body-timeout passes."""
    settings = ServeSettings(max_queue=2, body_timeout_s=3, timeout_s=30)
    image = base64.b64encode(GOOD).decode()
    body = json.dumps({"image": image}).encode()
    slow, stop = [], threading.Event()
    with live_server(create_app(predictor, settings)) as port:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            sock.sendall(
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            slow.append(sock)

        def trickle() -> None:
            for i in range(40):
                if stop.wait(0.5):
                    return
                for sock in slow:
                    with contextlib.suppress(OSError):  # answered and closed already
                        sock.send(body[i : i + 1])

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            time.sleep(1.0)  # every slow client is inside the app, sending
            started = time.monotonic()
            status, answer = _request(port, body)
            assert status == 200, answer[-300:]
            assert time.monotonic() - started < 2.5  # answered while the slow ones still send
            answers = []
            for sock in slow:
                answers.append(_response(sock))
            for status, answer in answers:
                assert status == 408, answer[-300:]
                assert b"--body-timeout" in answer
        finally:
            stop.set()
            sender.join(5)
            for sock in slow:
                sock.close()


def test_bodies_in_transit_are_bounded_in_memory(predictor):
    """Bodies are read before admission, so the bytes all bodies in transit hold are bounded
    instead (--max-queue x --max-upload-mb): past it, 503 at once."""
    settings = ServeSettings(max_queue=1, max_upload_mb=0.01)  # 10,485 bytes in transit
    body = json.dumps({"image": base64.b64encode(GOOD).decode()}).encode() + b" " * 3_000
    with live_server(create_app(predictor, settings)) as port:
        holder = socket.create_connection(("127.0.0.1", port), timeout=15)
        try:
            head = (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                f"\r\nContent-Length: {10_000}\r\n\r\n"
            )
            holder.sendall(head.encode() + b" " * 9_000)  # 9,000 bytes held, more to come
            time.sleep(0.5)
            status, answer = _request(port, body)
            assert status == 503 and b"in transit" in answer, answer[-300:]
        finally:
            holder.close()
        time.sleep(0.3)
        assert _request(port, body)[0] == 200  # released when the connection went


# ---- (c) Host header -----------------------------------------------------------------------------
def test_foreign_host_names_are_refused(predictor):
    """Only the server's own names are served: a page on another site that re-points its name
    at 127.0.0.1 (DNS rebinding) gets 421 naming the host; --allowed-host adds names."""
    app = create_app(predictor)
    with _client(app, "http://rebind.attacker.example") as client:
        refused = client.get("/model")
        assert refused.status_code == 421
        detail = refused.json()["detail"]
        assert "rebind.attacker.example" in detail and "--allowed-host" in detail
        assert client.post("/predict", files={"file": ("a.png", GOOD)}).status_code == 421
    for base in ("http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000"):
        with _client(app, base) as client:
            assert client.get("/model").status_code == 200, base
    with _client(app) as client:
        assert client.get("/model", headers={"host": ""}).status_code == 400
    with _client(app, "http://10.1.2.3:8000") as client:  # a probe by the pod's own address
        assert client.get("/health").status_code == 200
    named = create_app(predictor, ServeSettings(allowed_hosts=("myserver.lan", "*.corp")))
    for base, status in [
        ("http://myserver.lan:8000", 200),
        ("http://gpu1.corp", 200),
        ("http://other.lan", 421),
    ]:
        with _client(named, base) as client:
            assert client.get("/model").status_code == status, base
    anything = create_app(predictor, ServeSettings(allowed_hosts=("*",)))
    with _client(anything, "http://whatever.example") as client:
        assert client.get("/model").status_code == 200
    bound = create_app(predictor, ServeSettings(host="192.168.5.7"))
    with _client(bound, "http://192.168.5.7:8000") as client:
        assert client.get("/model").status_code == 200
    with pytest.raises(ConfigError, match="--allowed-host"):
        ServeSettings(allowed_hosts=("myserver.lan:8000",)).check()


# ---- (d) exposed without a token -----------------------------------------------------------------
def test_exposed_without_token_warns_loudly(model_dir, monkeypatch, capsys):
    """`serve --host 0.0.0.0` without --token warns on stderr and in the banner; with a token
    or on loopback it does not. --allowed-host reaches the served app."""
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    monkeypatch.delenv("LOOKCLOSER_TOKEN", raising=False)
    assert main(["serve", str(model_dir), "--host", "0.0.0.0", "--allowed-host", "box.lan"]) == 0
    out = capsys.readouterr()
    assert "WARNING" in out.err and "without --token" in out.err and "0.0.0.0" in out.err
    assert "WARNING" in out.out and "box.lan" in out.out  # the banner, with the names accepted
    app, options = served[-1]
    assert options["host"] == "0.0.0.0"
    with _client(app, "http://box.lan") as client:
        assert client.get("/model").status_code == 200
    with _client(app, "http://evil.example") as client:
        assert client.get("/model").status_code == 421
    backend = TorchBackend(Predictor.load(model_dir))
    for quiet in (ServeSettings(host="0.0.0.0", token="t0ken"), ServeSettings(host="::1")):
        serve_app.run(backend, quiet)
        out = capsys.readouterr()
        assert "WARNING" not in out.err + out.out
    serve_app.run(backend, ServeSettings(host="192.168.5.7"))
    assert "WARNING" in capsys.readouterr().err


# ---- fuzz ------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int, depth: int, colour: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def _garbled(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out[: max(1, cut)])


_images = st.one_of(
    st.builds(_png, st.tuples(st.integers(1, 300), st.integers(1, 300))),
    st.binary(max_size=300),
    st.builds(
        _garbled,
        st.just(GOOD),
        st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=6),
        st.integers(1, len(GOOD)),
    ),
    st.builds(
        _png_claiming,
        st.integers(0, 2**31),
        st.integers(0, 2**31),
        st.sampled_from([1, 2, 4, 8, 16, 3]),
        st.sampled_from([0, 2, 3, 4, 6, 7]),
    ),
)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and the infinities included
    st.integers(),
    st.integers(min_value=10**300, max_value=10**320),
    st.text(max_size=40),
    st.sampled_from(["2024-02-30", "2024-06-01", "1e999", "-0", " ", "nan"]),
)
_json_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["lat", "day_of_year", "date", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_meta_texts = st.one_of(
    st.just("{}"),
    st.builds(
        json.dumps,
        st.fixed_dictionaries(
            {}, optional={"lat": st.floats(-90, 90), "date": st.dates().map(str), "x": _leaf}
        ),
    ),
    st.builds(json.dumps, _json_values),
    st.integers(1, 200_000).map(lambda d: '{"lat": ' + "[" * d + "]" * d + "}"),
    st.integers(1, 200_000).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.integers(4_290, 4_310).map(lambda n: '{"lat": ' + "9" * n + "}"),
    st.text(max_size=30),
)
_any = st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70).map(str))
_queries = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {},
        optional={
            "k": st.integers(1, 5).map(str) | _any,
            "map": st.just("grad-cam") | _any,
            "target": st.sampled_from(["a", "c"]) | _any,
            "part": st.integers(0, 3).map(str) | _any,
            "style": st.sampled_from(["overlay", "figure"]) | _any,
        },
    ),
)


@given(
    route=st.sampled_from(["/predict", "/explain"]),
    form=st.sampled_from(["multipart", "json", "raw"]),
    image=_images,
    meta=st.one_of(st.none(), _meta_texts),
    query=_queries,
)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_fuzzed_requests_never_get_5xx_or_a_traceback(fuzz_client, route, form, image, meta, query):
    """Random and garbled images, random metadata JSON (deep, huge numbers, wrong types) and
    random query parameters: every answer is < 500, with no traceback in its body."""
    if form == "multipart":
        data = {"meta": meta} if meta is not None else {}
        response = fuzz_client.post(
            route, params=query, files={"file": ("f.png", image, "image/png")}, data=data
        )
    else:
        b64 = base64.b64encode(image).decode()
        if form == "json":
            body = f'{{"image": "{b64}", "meta": {meta}}}' if meta else f'{{"image": "{b64}"}}'
        else:  # the meta text as the whole body
            body = meta or ""
        response = fuzz_client.post(
            route, params=query, content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code < 500, (response.status_code, response.content[-500:])
    assert b"Traceback" not in response.content


@pytest.fixture(scope="module")
def fuzz_client(predictor):
    with _client(create_app(predictor, ServeSettings(timeout_s=20))) as client:
        yield client
