"""The HTTP API and web page of `lookcloser serve` (FastAPI, run by uvicorn).

Every request passes, in order: the bearer token (401), the bounded queue (503 when
`max_queue` requests are already in progress), the body read with a size limit (413) and a
deadline (408), the decoder with a pixel limit (422), then the model worker (503 when the
request's deadline passes first). A bad request never reaches the model, and every error
answers with `{"detail": "<what was wrong>"}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
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
from starlette.datastructures import UploadFile

from lookcloser.data.images import decode_bytes
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
    unsure_below: float | None = None  # None: from the model's validation metrics

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
            "unsure_below": (0 if self.unsure_below is None else self.unsure_below, 0, 1),
        }
        for name, (value, low, high) in ranges.items():
            if not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag}: expected a value in [{low}, {high}], got {value}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token: empty; leave it out to serve without a token")
        return self


# ---- schema --------------------------------------------------------------------------------------
class Error(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class TopClass(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_name: str = Field(alias="class")
    index: int
    prob: float


class PredictResponse(BaseModel):
    top: list[TopClass] = Field(description="the k most probable classes, most probable first")
    unsure: bool = Field(description="the top probability is below `unsure_below`")
    unsure_below: float


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
        413: "body larger than the upload limit",
        415: "neither multipart/form-data nor application/json",
        422: "not a readable image, bad metadata or a bad parameter",
        503: "the queue is full or the model did not answer in time",
    }.items()
}


# ---- request plumbing ------------------------------------------------------------------------------
def _limited_receive(receive: Callable[[], Awaitable[dict]], limit: int):
    """An ASGI receive that fails with 413 once the body passes `limit` bytes."""
    received = 0

    async def limited() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body larger than the limit of {limit} bytes")
        return message

    return limited


@dataclass
class _Input:
    data: bytes
    name: str  # for error messages: the upload's file name or "image"
    meta: dict[str, Any]


def _json_object(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPException(422, f"{what}: not valid JSON ({err})") from None


async def _read_input(request: Request, limit: int) -> _Input:
    """The image bytes and metadata of a multipart or JSON request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes; the limit is {limit} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = Request(request.scope, _limited_receive(request.receive, limit))
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
    if not isinstance(meta, dict):
        shown = repr(meta) if len(repr(meta)) <= 80 else repr(meta)[:77] + "..."
        raise HTTPException(422, f"meta: expected a JSON object of key: number, got {shown}")
    return _Input(data, name, meta)


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
    max_pixels = settings.max_pixels or backend.max_pixels
    # Decoding and resizing are CPU work: no more at once than there are cores, which also
    # bounds the memory decoded images take.
    decoders = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    backend.map_names()  # one dry run now, so no request runs the model outside the worker
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

    async def decoded(request: Request, deadline: float) -> tuple[Image.Image, Any, dict]:
        """The request's image, decoded and preprocessed, and its metadata."""
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0)):
                given = await _read_input(request, limit)
        except TimeoutError:
            raise HTTPException(
                408, f"the request body did not arrive within {settings.timeout_s} s"
            ) from None

        def decode() -> tuple[Image.Image, Any]:
            image, _ = decode_bytes(given.name, given.data, max_pixels)
            return image, backend.preprocess(image)

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
        with admission.slot():
            _, tensor, meta = await decoded(request, deadline)
            try:
                values, mask = backend.meta_row(meta)
            except DataError as err:
                raise HTTPException(422, str(err)) from None
            probs = await answer(worker.predict(tensor, values, mask), deadline)
        top, indices = probs.topk(min(k, len(backend.classes)))
        return {
            "top": [
                {"class": backend.classes[i], "index": i, "prob": round(p, 6)}
                for p, i in zip(top.tolist(), indices.tolist(), strict=True)
            ],
            "unsure": bool(top[0] < unsure_below),
            "unsure_below": unsure_below,
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
        with admission.slot():
            image, _, meta = await decoded(request, deadline)
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

    @app.get("/model", dependencies=protected, responses={401: _ERRORS[401]})
    def model_info() -> dict[str, Any]:
        """Classes, preprocessing, metrics, maps, metadata keys and how the server runs."""
        return {
            **backend.describe(),
            "unsure_below": {"value": unsure_below, "source": unsure_source},
            "explain": "PyTorch model of the directory (Grad-CAM needs gradients)"
            if backend.name != "torch"
            else "PyTorch",
            "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
            "limits": {
                "max_upload_bytes": limit,
                "max_pixels": max_pixels,
                "max_queue": settings.max_queue,
                "timeout_s": settings.timeout_s,
            },
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and load: requests in progress, forwards run, memory."""
        return {
            "status": "ok",
            "backend": backend.name,
            "in_flight": admission.in_flight,
            "forwards": worker.forwards,
            "predicted": worker.predicted,
            "rss_mb": _rss_mb(),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    app.state.settings = settings
    app.state.worker = worker
    app.state.backend = backend
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


def run(backend: Backend, settings: ServeSettings) -> None:
    """Serve until interrupted (uvicorn on settings.host:settings.port)."""
    import uvicorn

    app = create_app(backend, settings)
    shown = asdict(settings) | {"token": "***" if settings.token else None}
    print(
        f"lookcloser serve: {backend.name} backend, {len(backend.classes)} classes, "
        f"http://{settings.host}:{settings.port}/ ({shown})",
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
