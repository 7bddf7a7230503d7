"""Shared test fixtures."""

from __future__ import annotations

import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """The suite's own cache folder (generated data, image verdicts): never the user's,
    shared by the whole session and by the commands it starts."""
    import os

    folder = tmp_path_factory.mktemp("lookcloser-cache")
    previous = os.environ.get("LOOKCLOSER_CACHE")
    os.environ["LOOKCLOSER_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("LOOKCLOSER_CACHE", None)
    else:
        os.environ["LOOKCLOSER_CACHE"] = previous


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves files under the server's root with HTTP Range support and injectable faults."""

    server: LocalHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        self.server.requests.append((rel, self.headers.get("Range")))
        path = self.server.root / rel
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and not self.server.ignore_range:
            start = int(wanted[6:].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        cut = self.server.cut_after.pop(rel, None)
        if cut is None:
            self.wfile.write(body)
            return
        # Simulate a dropped connection: send part of the body, then close the socket.
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class LocalHTTPServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 serving `root`, recording (path, Range) of each request."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        # path -> bytes of body to send before dropping the connection (once).
        self.cut_after: dict[str, int] = {}
        self.ignore_range = False

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def put(self, url_path: str, data: bytes) -> str:
        """Serve `data` at `url_path`; returns its full URL."""
        path = self.root / url_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{self.url}/{url_path.lstrip('/')}"


@pytest.fixture
def http_server(tmp_path: Path):
    """A local HTTP server (Range requests, dropped connections on demand) over tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server = LocalHTTPServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
