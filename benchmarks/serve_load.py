"""Load on `lookcloser serve` over loopback: N concurrent clients for T seconds, with and
without micro-batching, in the same run.

Each mode has its own server (`lookcloser serve MODEL_DIR --port P --max-batch B`, a real
uvicorn process on 127.0.0.1). Both are warmed up, then N client threads POST images to
/predict (multipart, keep-alive connections), in rounds that alternate between the modes
(T seconds per mode in all), so that the machine's other load hits both alike. Reported per
mode: requests/s, p50 and p99 latency, errors (any answer but 200, or a failed connection),
the server's mean batch size (images / forwards, from /health) and its resident memory after
the warm-up and after each round (steady when nothing leaks).
The images are synthetic (lookcloser's generator), so nothing from a dataset is needed.

    python benchmarks/serve_load.py MODEL_DIR [--clients 8] [--seconds 10] [--rounds 4]
        [--max-batch 8] [--backend torch|onnx] [--write]
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


def run_clients(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list, float]:
    """N client threads for T seconds; their (latency, status) results and the time taken."""
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
    return [r for rs in results for r in rs], time.monotonic() - start


def summarize(done: list, elapsed: float, before: dict, after: dict, rss: list[float]) -> dict:
    """Requests/s, latency percentiles, errors, images per forward and memory of one mode."""
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
        "rss_mb": rss,
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
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before timing")
    parser.add_argument("--rounds", type=int, default=4, help="alternations between the modes")
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
    servers = {
        name: Server(args.model_dir, args.backend, max_batch, ["--max-queue", "256"])
        for name, max_batch in modes.items()
    }
    try:
        # Warm-up at the same load: first forwards, lazy imports, the allocator's pools.
        for server in servers.values():
            run_clients(server.port, bodies, args.clients, args.warmup)
        before = {name: get_json(s.port, "/health") for name, s in servers.items()}
        done = {name: [] for name in modes}
        elapsed = dict.fromkeys(modes, 0.0)
        rss = {name: [before[name]["rss_mb"]] for name in modes}
        # Rounds alternate between the modes, so the machine's other load hits both alike.
        for _ in range(args.rounds):
            for name, server in servers.items():
                results, took = run_clients(
                    server.port, bodies, args.clients, args.seconds / args.rounds
                )
                done[name] += results
                elapsed[name] += took
                rss[name].append(get_json(server.port, "/health")["rss_mb"])
        after = {name: get_json(s.port, "/health") for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    rows, figures = [], {}
    for name in modes:
        figures[name] = result = summarize(
            done[name], elapsed[name], before[name], after[name], rss[name]
        )
        print(name, json.dumps(result), flush=True)
        rows.append(
            [
                name,
                f"{result['rate']:.1f}",
                f"{result['p50_ms']:.0f}",
                f"{result['p99_ms']:.0f}",
                f"{result['mean_batch']:.2f}",
                f"{result['errors']} of {result['requests']}",
                " / ".join(f"{m:.0f}" for m in result["rss_mb"]),
            ]
        )
    unbatched, batched = (figures[n]["rate"] for n in modes)
    ratio = batched / unbatched if unbatched else float("nan")
    print(f"throughput ratio micro-batched / unbatched: {ratio:.2f}")

    record = json.loads((args.model_dir / "model.json").read_text())
    command = (
        f"nice -n 10 python benchmarks/serve_load.py MODEL_DIR --clients {args.clients} "
        f"--seconds {args.seconds:g} --max-batch {args.max_batch} --backend {args.backend} "
        f"--image-size {args.image_size} --warmup {args.warmup:g} --rounds {args.rounds} --write"
    )
    text = "\n".join(
        [
            "## serve-load: `lookcloser serve` under concurrent clients, with and without "
            "micro-batching",
            "",
            f"{args.clients} clients on loopback for {args.seconds:g} s per mode, in {args.rounds} "
            "rounds that alternate between the modes, each client POSTing "
            f"{args.image_size} px synthetic PNGs to /predict (multipart, keep-alive); model: "
            f"{record['method']} {record['backbone']} at {record['preprocessing']['image_size']} "
            f"px, {len(record['classes'])} classes, {args.backend} backend. One server per mode, "
            f"both warmed up by {args.warmup:g} s of the same load; memory is the server's "
            "resident set (from /health) after the warm-up and after each round.",
            "",
            markdown_table(
                [
                    "mode",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "images per forward",
                    "errors",
                    "server MiB, after warm-up / each round",
                ],
                rows,
            ),
            "",
            f"Throughput ratio micro-batched / unbatched: **{ratio:.2f}x**.",
            "",
            f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (the "
            f"machine's other jobs share its {os.cpu_count()} cores). Command: `{command}`.",
        ]
    )
    print(text)
    if args.write:
        write_section("serve-load", text)


if __name__ == "__main__":
    main()
