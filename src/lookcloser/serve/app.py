"""The HTTP API and web page of `lookcloser serve` (FastAPI, run by uvicorn).

Every request passes, in order: the Host header (421 unless it names this server: a page
on another site cannot reach it through DNS rebinding), the bearer token (401), the body
read with a size limit (413), a deadline (408) and a bound on the bytes all bodies in transit
hold (503), then the bounded queue (503 when `max_queue` requests are already in progress),
the decoder with pixel and aspect-ratio limits (422), then the model worker (503 when the
request's deadline passes first). A request is admitted into the queue only once its body has
arrived, so clients that send slowly cannot hold the queue's places. A bad request never
reaches the model, and every error answers with `{"detail": "<what was wrong>"}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import os
import reprlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from lookcloser.data.images import decode_bytes, image_errors
from lookcloser.errors import BadImageError, ConfigError, DataError
from lookcloser.predictor import Predictor
from lookcloser.serve.backends import Backend, TorchBackend
from lookcloser.serve.batching import ModelWorker


@dataclass
class ServeSettings:
    """How the server runs and what it accepts (the `lookcloser serve` options)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    token: str | None = None  # when set, /predict, /explain and /model need `Bearer <token>`
    max_batch: int = 8  # images per forward; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to batch
    max_queue: int = 64  # requests in progress at once; more are answered 503
    max_upload_mb: float = 20.0  # request body limit (413)
    max_pixels: int | None = None  # decoded image limit (422); None: the model's
    timeout_s: float = 30.0  # per request, from arrival to answer (408 / 503)
    body_timeout_s: float = 10.0  # for the request body to arrive (408)
    unsure_below: float | None = None  # None: from the model's validation metrics
    # Host names accepted besides the loopback names and `host` ("*" turns the check off).
    allowed_hosts: tuple[str, ...] = ()
    # Look-alikes, with a gallery (MODEL_DIR/gallery, or `gallery`): references shown per class.
    neighbours: int = 3
    gallery: str | None = None  # a gallery folder (default: the model directory's)
    gallery_root: str | None = None  # where the references' images are (default: recorded)

    def check(self) -> ServeSettings:
        """ConfigError naming the first option out of its range."""
        ranges = {
            "port": (self.port, 0, 65535),
            "max_batch": (self.max_batch, 1, 4096),
            "max_wait_ms": (self.max_wait_ms, 0, 10_000),
            "max_queue": (self.max_queue, 1, 1_000_000),
            "max_upload_mb": (self.max_upload_mb, 0.001, 10_000),
            "max_pixels": (self.max_pixels or 1, 1, 10**12),
            "timeout_s": (self.timeout_s, 0.001, 86_400),
            "body_timeout_s": (self.body_timeout_s, 0.001, 86_400),
            "unsure_below": (0 if self.unsure_below is None else self.unsure_below, 0, 1),
            "neighbours": (self.neighbours, 0, 100),
        }
        for name, (value, low, high) in ranges.items():
            if not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag}: expected a value in [{low}, {high}], got {value}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token: empty; leave it out to serve without a token")
        for name in self.allowed_hosts:
            if not _valid_host_option(name):
                raise ConfigError(
                    f"--allowed-host: {name!r}: expected a host name or address without a "
                    "port or scheme, e.g. myserver.lan or 192.168.1.20"
                )
        return self

    def host_names(self) -> set[str] | None:
        """The Host header names served (lower case, no port); None when any is ("*")."""
        given = {_host_name(h) for h in self.allowed_hosts}
        if "*" in given:
            return None
        names = {*LOOPBACK_NAMES, _host_name(self.host), *given}
        if _host_name(self.host) in WILDCARD_HOSTS:  # every interface: this machine's names too
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return names - {""}

    def exposure_warning(self) -> str | None:
        """A warning when the server listens beyond this machine without a token."""
        if self.token is not None or _is_loopback(self.host):
            return None
        return (
            f"WARNING: serving on {self.host} without --token: anyone who can reach this "
            "address can use the model. Pass --token (or set LOOKCLOSER_TOKEN), or bind "
            "--host 127.0.0.1."
        )


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bind addresses meaning every interface
MAX_META_TEXT = 256  # characters in one text metadata value (a date, a number as text)
# On answers given before the body was read: the server drops the connection rather than
# keep it open for the rest of a body it will not read.
_CLOSE = {"Connection": "close"}


def _host_name(host: str) -> str:
    """A Host header or bind address without port, brackets or trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.split(":")[0]
    return host.rstrip(".")


def _valid_host_option(name: str) -> bool:
    bare = name.strip().strip("[]")
    if not bare or any(c in bare for c in "/ @"):
        return False
    if ":" in bare:  # only an IPv6 address may hold colons: name:port is a mistake
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            return False
    return True


def _is_loopback(host: str) -> bool:
    name = _host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name (other than localhost) may resolve to any interface


class HostCheck:
    """ASGI middleware answering 421 to requests whose Host header names none of `names`.

    With no token, a web page on another site could otherwise read the server: its name is
    re-pointed (DNS rebinding) at 127.0.0.1, and the browser then sends its own name as Host.
    Starlette's TrustedHostMiddleware answers in plain text; this one in the API's JSON form,
    naming the host and the option that accepts it. `/health` stays open (it tells nothing
    about the model), so probes that address the server by an IP of its own still work.
    """

    def __init__(self, app: ASGIApp, names: set[str] | None):
        self.app = app
        self.names = names

    def _served(self, host: str) -> bool:
        return host in self.names or any(
            n.startswith("*.") and host.endswith(n[1:]) for n in self.names
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or self.names is None
            or scope.get("path") == "/health"
        ):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host", "")
        host = _host_name(given)
        if host and self._served(host):
            await self.app(scope, receive, send)
            return
        shown = reprlib.repr(given) if given else "missing"
        accepted = ", ".join(sorted(self.names))
        detail = (
            f"Host header {shown}: not a name this server answers to ({accepted}); "
            "start it with --allowed-host NAME to accept another"
        )
        await JSONResponse({"detail": detail}, status_code=421 if host else 400)(
            scope, receive, send
        )


# ---- schema --------------------------------------------------------------------------------------
class Error(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class TopClass(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_name: str = Field(alias="class")
    index: int
    prob: float


class Reference(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    row: int = Field(description="GET /gallery/{row} answers its thumbnail")
    path: str = Field(description="relative to the gallery's data root")
    class_name: str = Field(alias="class")
    similarity: float = Field(description="cosine similarity of the embeddings")


class ClassReferences(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_name: str = Field(alias="class")
    neighbours: list[Reference]


class OpenSet(BaseModel):
    score: str
    value: float
    threshold: float = Field(description="calibrated on the validation split")


class PredictResponse(BaseModel):
    top: list[TopClass] = Field(description="the k most probable classes, most probable first")
    unsure: bool = Field(description="the top probability is below `unsure_below`")
    unsure_below: float
    neighbours: list[ClassReferences] | None = Field(
        None, description="with a gallery: the nearest references of the top two classes"
    )
    unknown: bool | None = Field(
        None, description="with a calibrated gallery: none of the model's classes"
    )
    open_set: OpenSet | None = None


def _example_png() -> str:
    """A 16 x 16 PNG, base64: the request example in the OpenAPI schema (and for fuzzers)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "meta": {"type": "string", "description": "JSON object of metadata"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "description": "the image file, base64"},
                        "meta": {"type": "object", "description": "the model's meta_keys"},
                    },
                },
                "example": {"image": _example_png(), "meta": {}},
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        400: "malformed or empty body",
        401: "missing or wrong bearer token",
        408: "the body took longer than the timeout to arrive",
        421: "the Host header names none of the server's names (--allowed-host)",
        413: "body larger than the upload limit",
        415: "neither multipart/form-data nor application/json",
        422: "not a readable image, bad metadata or a bad parameter",
        503: "the queue is full, bodies in transit hold too much memory, or the model did "
        "not answer in time",
    }.items()
}


# ---- request plumbing ------------------------------------------------------------------------------
def _limited_receive(
    receive: Callable[[], Awaitable[dict]], limit: int, account: Callable[[int], None]
):
    """An ASGI receive that fails with 413 once the body passes `limit` bytes, and hands each
    chunk's size to `account` (the bound on all bodies in transit)."""
    received = 0

    async def limited() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            received += size
            if received > limit:
                raise HTTPException(
                    413, f"request body larger than the limit of {limit} bytes", headers=_CLOSE
                )
            account(size)
        return message

    return limited


class _Bodies:
    """Request bodies in transit: how many, and the bytes they hold, bounded (503 past it).

    Bodies are read before a request is admitted into the queue, so slow senders hold no place
    in it; this bound keeps the memory of many fast ones what the queue used to bound.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0
        self.receiving = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[Callable[[int], None]]:
        """While receiving one body: a function counting its chunks (bytes held until exit)."""
        mine = 0

        def account(size: int) -> None:
            nonlocal mine
            if self.held + size > self.max_bytes:
                raise HTTPException(
                    503,
                    f"server busy: request bodies in transit hold {self.held} bytes, the "
                    f"limit is {self.max_bytes} (--max-queue x --max-upload-mb); retry shortly",
                    headers={"Retry-After": "1", **_CLOSE},
                )
            self.held += size
            mine += size

        self.receiving += 1
        try:
            yield account
        finally:
            self.receiving -= 1
            self.held -= mine


@dataclass
class _Input:
    data: bytes
    name: str  # for error messages: the upload's file name or "image"
    meta: dict[str, Any]


def _json_object(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise HTTPException(422, f"{what}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError; ints past 4300 digits
        raise HTTPException(422, f"{what}: not valid JSON ({err})") from None


def _checked_meta(meta: Any) -> dict[str, Any]:
    """The request's metadata: an object of key -> number, text or null, else 422."""
    if not isinstance(meta, dict):
        raise HTTPException(
            422, f"meta: expected a JSON object of key: number, got {reprlib.repr(meta)}"
        )
    for key, value in meta.items():
        if isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "a list"
            raise HTTPException(
                422, f"meta {reprlib.repr(key)}: expected a number, text or null, got {kind}"
            )
        if isinstance(value, str) and len(value) > MAX_META_TEXT:
            raise HTTPException(
                422,
                f"meta {reprlib.repr(key)}: text of {len(value)} characters; at most "
                f"{MAX_META_TEXT} (a number or a date)",
            )
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                raise HTTPException(
                    422, f"meta {reprlib.repr(key)}: number too large for a float"
                ) from None
    return meta


async def _read_input(request: Request, limit: int, account: Callable[[int], None]) -> _Input:
    """The image bytes and metadata of a multipart or JSON request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"request body of {declared} bytes; the limit is {limit} bytes", headers=_CLOSE
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = Request(request.scope, _limited_receive(request.receive, limit, account))
    if ctype == "multipart/form-data":
        form = await limited.form(max_files=1, max_fields=4)
        try:
            upload = form.get("file")
            if upload is None:
                got = ", ".join(repr(k) for k in form) or "no fields"
                raise HTTPException(422, f"no image in the form field 'file' (got {got})")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "form field 'file': expected a file upload, got text")
            data = await upload.read()
            name = upload.filename or "file"
            meta = form.get("meta")
            meta = _json_object(meta, "form field 'meta'") if isinstance(meta, str) else {}
        finally:
            await form.close()
    elif ctype == "application/json":
        body = _json_object(await limited.body(), "JSON body")
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise HTTPException(
                422, 'JSON body: expected {"image": "<base64 image>", "meta": {...}}'
            )
        text = body["image"]
        if text.startswith("data:") and "," in text:  # a data: URL as browsers make them
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise HTTPException(422, f"JSON field 'image': not valid base64 ({err})") from None
        name, meta = "image", body.get("meta") or {}
    elif not ctype and not await limited.body():
        raise HTTPException(
            400, "empty request: send an image as the multipart field 'file' or JSON {image}"
        )
    else:
        raise HTTPException(
            415,
            f"content type {ctype or 'none'!r}: send multipart/form-data (field 'file') or "
            "application/json ({image: base64})",
        )
    if not data:
        raise HTTPException(422, f"{name}: empty file")
    return _Input(data, name, _checked_meta(meta))


class _Admission:
    """At most `limit` requests in progress; the rest are answered 503 at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        # Requests run on one event loop: the counter needs no lock.
        if self.in_flight >= self.limit:
            raise HTTPException(
                503,
                f"server busy: {self.limit} requests already in progress (--max-queue); "
                "retry shortly",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux), for watching leaks under load."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


# A magnifying glass: the page's icon, so the browser's request for one is not a 404.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<circle cx="13" cy="13" r="9" fill="#fff" stroke="#3b6fd8" stroke-width="4"/>'
    '<path d="M20 20l9 9" stroke="#1d2330" stroke-width="5" stroke-linecap="round"/></svg>'
)


def _page() -> str:
    return resources.files("lookcloser.serve").joinpath("static/index.html").read_text("utf-8")


# ---- the app ----------------------------------------------------------------------------------------
def create_app(model: Backend | Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The server for one model (a Backend, or a Predictor served on PyTorch)."""
    settings = (settings or ServeSettings()).check()
    backend = model if isinstance(model, Backend) else TorchBackend(model)
    worker = ModelWorker(backend, settings.max_batch, settings.max_wait_ms / 1000)
    admission = _Admission(settings.max_queue)
    limit = int(settings.max_upload_mb * 2**20)
    bodies = _Bodies(settings.max_queue * limit)
    max_pixels = settings.max_pixels or backend.max_pixels
    # Decoding and resizing are CPU work: no more at once than there are cores, which also
    # bounds the memory decoded images take.
    decoders = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    backend.map_names()  # one dry run now, so no request runs the model outside the worker
    from lookcloser.lookalikes.answers import serve_lookalikes

    lookalikes = serve_lookalikes(backend, settings.gallery)  # None without a gallery
    if settings.unsure_below is not None:
        unsure_below, unsure_source = settings.unsure_below, "--unsure-below"
    else:
        unsure_below, unsure_source = backend.unsure_below()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="lookcloser",
        summary="Fine-grained identification with heatmaps",
        lifespan=lifespan,
    )
    app.add_middleware(HostCheck, names=settings.host_names())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        # One readable line, like every other error here (FastAPI's default is a list).
        parts = [
            f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in err.errors()
        ]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.token.encode()
        ):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def received(request: Request, deadline: float, account: Callable[[int], None]) -> _Input:
        """The request's body, read before the request takes a place in the queue."""
        wait = min(settings.body_timeout_s, settings.timeout_s)
        flag = "--body-timeout" if settings.body_timeout_s <= settings.timeout_s else "--timeout"
        try:
            with anyio.fail_after(max(min(deadline - time.monotonic(), wait), 0)):
                return await _read_input(request, limit, account)
        except TimeoutError:
            raise HTTPException(
                408,
                f"the request body did not arrive within {wait} s ({flag})",
                headers=_CLOSE,  # the rest of the body is not waited for either
            ) from None
        except ClientDisconnect:  # nobody to answer; ends the request without an error log
            raise HTTPException(400, "the client left before sending the whole body") from None

    async def decoded(given: _Input) -> tuple[Image.Image, Any, dict]:
        """The request's image, decoded and preprocessed, and its metadata."""

        def decode() -> tuple[Image.Image, Any]:
            image, _ = decode_bytes(given.name, given.data, max_pixels)
            try:
                with image_errors(given.name):
                    return image, backend.preprocess(image)
            except BadImageError as err:  # the Predictor calls a PIL image "image"
                raise BadImageError(given.name, err.reason) from None

        try:
            image, tensor = await anyio.to_thread.run_sync(decode, limiter=decoders)
        except BadImageError as err:
            raise HTTPException(422, str(err)) from None
        return image, tensor, given.meta

    async def answer(future: Future, deadline: float) -> Any:
        """The model worker's result, or 503 once the request's deadline passes."""
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), max(deadline - time.monotonic(), 0)
            )
        except TimeoutError:
            future.cancel()
            raise HTTPException(
                503, f"the model did not answer within {settings.timeout_s} s (--timeout)"
            ) from None
        except (ConfigError, DataError) as err:  # an unknown map, class or part; bad meta
            raise HTTPException(422, str(err)) from None

    protected = [Depends(require_token)]

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=_IMAGE_BODY,
        dependencies=protected,
        summary="Top-k classes of one image",
    )
    async def predict(
        request: Request,
        k: int = Query(5, ge=1, le=10_000, description="classes to return"),
    ) -> dict[str, Any]:
        deadline = time.monotonic() + settings.timeout_s
        with bodies.reading() as account:
            given = await received(request, deadline, account)
            with admission.slot():
                _, tensor, meta = await decoded(given)
                try:
                    values, mask = backend.meta_row(meta)
                except DataError as err:
                    raise HTTPException(422, str(err)) from None
                probs = await answer(worker.predict(tensor, values, mask), deadline)
                extra = {}
                if lookalikes is not None:  # one more forward, on the model thread
                    job = worker.call(lambda: backend.embed(tensor[None], values[None], mask[None]))
                    logits, embedding = await answer(job, deadline)
                    extra = lookalikes.answer(
                        logits.numpy(),
                        embedding.numpy(),
                        probs.topk(2).indices.tolist(),
                        settings.neighbours,
                    )
        top, indices = probs.topk(min(k, len(backend.classes)))
        return {
            "top": [
                {"class": backend.classes[i], "index": i, "prob": round(p, 6)}
                for p, i in zip(top.tolist(), indices.tolist(), strict=True)
            ],
            "unsure": bool(top[0] < unsure_below),
            "unsure_below": unsure_below,
            **extra,
        }

    @app.post(
        "/explain",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the heatmap over the image"},
            **_ERRORS,
        },
        openapi_extra=_IMAGE_BODY,
        dependencies=protected,
        summary="Where the model looked: a heatmap over the image, as a PNG",
    )
    async def explain(
        request: Request,
        map: str | None = Query(None, description="one of GET /model's maps (default: the first)"),
        target: str | None = Query(None, description="class to explain (default: the top one)"),
        part: int | None = Query(None, ge=0, description="part map K (models with parts)"),
        style: str = Query(
            "overlay",
            pattern="^(overlay|figure)$",
            description="overlay: the heatmap over the model's input view; figure: with the "
            "input, the method's own views and a colour bar",
        ),
    ) -> Response:
        deadline = time.monotonic() + settings.timeout_s
        with bodies.reading() as account:
            given = await received(request, deadline, account)
            with admission.slot():
                image, _, meta = await decoded(given)
                job = worker.call(lambda: backend.explain(image, map, target, meta, part))
                explanation = await answer(job, deadline)
        png = await anyio.to_thread.run_sync(_render, explanation, style, limiter=decoders)
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Class": quote(explanation.class_name),
                "X-Probability": f"{explanation.prob:.6f}",
                "X-Map": quote(explanation.map_name),
            },
        )

    @app.get(
        "/gallery/{row}",
        dependencies=protected,
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "a reference's thumbnail"},
            401: _ERRORS[401],
            404: {"model": Error, "description": "no gallery, no such row or unreadable"},
        },
        summary="The thumbnail of a gallery reference (read from the data root)",
    )
    async def gallery_image(row: int) -> Response:
        if lookalikes is None:
            raise HTTPException(404, "this model has no gallery (lookcloser gallery build)")
        try:
            data = await anyio.to_thread.run_sync(
                lookalikes.thumbnail_bytes,
                row,
                settings.gallery_root,
                max_pixels,
                limiter=decoders,
            )
        except (ConfigError, DataError) as err:
            raise HTTPException(404, str(err)) from None
        return Response(data, media_type="image/jpeg")

    @app.get("/model", dependencies=protected, responses={401: _ERRORS[401]})
    def model_info() -> dict[str, Any]:
        """Classes, preprocessing, metrics, maps, metadata keys and how the server runs."""
        return {
            **backend.describe(),
            "unsure_below": {"value": unsure_below, "source": unsure_source},
            "gallery": lookalikes.describe(settings.neighbours) if lookalikes else None,
            "explain": "PyTorch model of the directory (Grad-CAM needs gradients)"
            if backend.name != "torch"
            else "PyTorch",
            "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
            "limits": {
                "max_upload_bytes": limit,
                "max_pixels": max_pixels,
                "max_queue": settings.max_queue,
                "timeout_s": settings.timeout_s,
                "body_timeout_s": settings.body_timeout_s,
            },
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and load: requests in progress, forwards run, memory."""
        return {
            "status": "ok",
            "backend": backend.name,
            "in_flight": admission.in_flight,
            "receiving": bodies.receiving,
            "forwards": worker.forwards,
            "predicted": worker.predicted,
            "rss_mb": _rss_mb(),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    # The page links favicon.svg; /favicon.ico is what browsers ask for without a link.
    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(
            FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    app.state.settings = settings
    app.state.worker = worker
    app.state.backend = backend
    app.state.unsure_below = (unsure_below, unsure_source)
    app.state.lookalikes = lookalikes
    return app


def _render(explanation, style: str) -> bytes:
    """The explanation as PNG bytes: the overlay alone, or lookcloser explain's figure."""
    from lookcloser.explain.overlay import explanation_figure, overlay

    buffer = io.BytesIO()
    if style == "figure":
        fig = explanation_figure(explanation)
        try:
            fig.savefig(buffer, format="png", dpi=100, facecolor="white")
        finally:
            fig.clear()
    else:
        overlay(explanation.image, explanation.heatmap).save(buffer, format="PNG")
    return buffer.getvalue()


def banner(app: FastAPI) -> str:
    """What `lookcloser serve` prints at start-up: where it listens and how, one fact a line."""
    settings: ServeSettings = app.state.settings
    backend: Backend = app.state.backend
    unsure_below, unsure_source = app.state.unsure_below
    names = settings.host_names()
    hosts = "any (--allowed-host '*')" if names is None else ", ".join(sorted(names))
    if names is not None and _host_name(settings.host) in WILDCARD_HOSTS:
        hosts += " (add the names and addresses clients use with --allowed-host)"
    pixels = settings.max_pixels or backend.max_pixels
    lookalikes = app.state.lookalikes
    if lookalikes is None:
        similar = "none (no gallery: lookcloser gallery build)"
    else:
        found = lookalikes.describe(settings.neighbours)
        similar = f"{settings.neighbours} per answer from a gallery of {found['references']} images"
    lines = [
        f"lookcloser serve: http://{settings.host}:{settings.port}/ "
        f"({backend.name} backend, {len(backend.classes)} classes)",
        f"  unsure below:  p < {unsure_below:.3f} ({unsure_source})",
        f"  token:         {'required (Authorization: Bearer ...)' if settings.token else 'none'}",
        f"  host names:    {hosts}",
        f"  batching:      up to {settings.max_batch} images a forward, waiting up to "
        f"{settings.max_wait_ms:g} ms; at most {settings.max_queue} requests at once",
        f"  limits:        {settings.max_upload_mb:g} MB a request, {pixels:,} pixels an image, "
        f"{settings.timeout_s:g} s a request ({settings.body_timeout_s:g} s for its body)",
        f"  look-alikes:   {similar}",
    ]
    return "\n".join(lines)


def run(backend: Backend, settings: ServeSettings) -> None:
    """Serve until interrupted (uvicorn on settings.host:settings.port)."""
    import uvicorn

    app = create_app(backend, settings)
    warning = settings.exposure_warning()
    print(banner(app) + (f"\n{warning}" if warning else ""), flush=True)
    if warning:  # stdout may be a log file nobody reads: say it where errors go too
        print(f"lookcloser serve: {warning}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
