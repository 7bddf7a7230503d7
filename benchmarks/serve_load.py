"""Load on `lookcloser serve` over loopback: N concurrent clients for T seconds, with and
without micro-batching, in the same run.

Each mode starts its own server (`lookcloser serve MODEL_DIR --port P --max-batch B`, a real
uvicorn process on 127.0.0.1), warms it up, then N client threads POST images to /predict
(multipart, keep-alive connections) for T seconds. Reported per mode: requests/s, p50 and
p99 latency, errors (any answer but 200, or a failed connection), the server's mean batch
size (images / forwards, from /health) and its resident memory before and after the load.
The images are synthetic (lookcloser's generator), so nothing from a dataset is needed.

    python benchmarks/serve_load.py MODEL_DIR [--clients 8] [--seconds 10] [--max-batch 8]
        [--backend torch|onnx] [--write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
BOUNDARY = "lookcloser-load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(image: Path) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"'
        "\r\nContent-Type: image/png\r\n\r\n"
    )
    return head.encode() + image.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class Server:
    """`lookcloser serve` in a child process on a free loopback port."""

    def __init__(self, model_dir: Path, backend: str, max_batch: int, extra: list[str]):
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "lookcloser.cli",
            "serve",
            str(model_dir),
            "--port",
            str(self.port),
            "--backend",
            backend,
            "--max-batch",
            str(max_batch),
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                get_json(self.port, "/health")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(
                        f"server did not start: {self.process.stdout.read()}"
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def client(port: int, bodies: list[bytes], stop_at: float, out: list, seed: int) -> None:
    """POST /predict in a loop until `stop_at`; appends (latency s, status or error)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = seed
    while time.monotonic() < stop_at:
        body = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            conn.request(
                "POST",
                "/predict?k=5",
                body=body,
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
            response = conn.getresponse()
            response.read()
            out.append((time.perf_counter() - start, response.status))
        except (OSError, http.client.HTTPException) as err:
            out.append((time.perf_counter() - start, type(err).__name__))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """N clients for T seconds against a running server."""
    for body in bodies[:2]:  # warm-up: first forwards, lazy imports
        client(port, [body], time.monotonic() + 0.01, [], 0)
    before = get_json(port, "/health")
    results: list[list] = [[] for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(port, bodies, stop_at, results[i], i))
        for i in range(clients)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    after = get_json(port, "/health")
    done = [r for rs in results for r in rs]
    ok = sorted(latency for latency, status in done if status == 200)
    images = after["predicted"] - before["predicted"]
    forwards = after["forwards"] - before["forwards"]
    return {
        "requests": len(done),
        "ok": len(ok),
        "errors": len(done) - len(ok),
        "rate": len(ok) / elapsed,
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan"),
        "mean_batch": images / forwards if forwards else float("nan"),
        "rss_before": before["rss_mb"],
        "rss_after": after["rss_mb"],
    }


def synthetic_images(folder: Path, size: int, count: int) -> list[Path]:
    from lookcloser.data.synthetic import generate

    root = generate(folder, classes=4, per_class=1, test_per_class=count // 4 + 1, size=size)
    return sorted(root.glob("test/*/*.png"))[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (<= 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per mode (<= 120)")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched mode's batch")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--image-size", type=int, default=256, help="side of the posted images")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 120:
        raise SystemExit("--clients must be in [1, 64] and --seconds in (0, 120]")

    with tempfile.TemporaryDirectory() as tmp:
        bodies = [multipart(p) for p in synthetic_images(Path(tmp), args.image_size, 16)]
    modes = {
        "unbatched (--max-batch 1)": 1,
        f"micro-batched (--max-batch {args.max_batch})": args.max_batch,
    }
    rows, figures = [], {}
    for name, max_batch in modes.items():
        server = Server(args.model_dir, args.backend, max_batch, ["--max-queue", "256"])
        try:
            figures[name] = result = load(server.port, bodies, args.clients, args.seconds)
        finally:
            server.stop()
        print(name, json.dumps(result), flush=True)
        rows.append(
            [
                name,
                f"{result['rate']:.1f}",
                f"{result['p50_ms']:.0f}",
                f"{result['p99_ms']:.0f}",
                f"{result['mean_batch']:.2f}",
                f"{result['errors']} of {result['requests']}",
                f"{result['rss_before']:.0f} -> {result['rss_after']:.0f}",
            ]
        )
    unbatched, batched = (figures[n]["rate"] for n in modes)
    ratio = batched / unbatched if unbatched else float("nan")
    print(f"throughput ratio micro-batched / unbatched: {ratio:.2f}")

    record = json.loads((args.model_dir / "model.json").read_text())
    command = (
        f"nice -n 10 python benchmarks/serve_load.py MODEL_DIR --clients {args.clients} "
        f"--seconds {args.seconds:g} --max-batch {args.max_batch} --backend {args.backend} "
        f"--image-size {args.image_size} --write"
    )
    text = "\n".join(
        [
            "## serve-load: `lookcloser serve` under concurrent clients, with and without "
            "micro-batching",
            "",
            f"{args.clients} clients on loopback for {args.seconds:g} s per mode, each POSTing "
            f"{args.image_size} px synthetic PNGs to /predict (multipart, keep-alive); model: "
            f"{record['method']} {record['backbone']} at {record['preprocessing']['image_size']} "
            f"px, {len(record['classes'])} classes, {args.backend} backend. A fresh server per "
            "mode; memory is the server's resident set before and after the load (from /health).",
            "",
            markdown_table(
                [
                    "mode",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "images per forward",
                    "errors",
                    "server MiB",
                ],
                rows,
            ),
            "",
            f"Throughput ratio micro-batched / unbatched: **{ratio:.2f}x**.",
            "",
            f"Machine: {machine()}. Command: `{command}`.",
        ]
    )
    print(text)
    if args.write:
        write_section("serve-load", text)


if __name__ == "__main__":
    main()
