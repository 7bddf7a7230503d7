"""Bad input to a running `lookcloser serve`, for many rounds: every bad request gets its 4xx,
a good request after each round still gets 200, and the server's memory stays level.

One real server (uvicorn on 127.0.0.1, `--token` and `--max-upload-mb 1` set). Each round
sends every kind of bad request (non-image, truncated PNG, a decompression bomb, empty body,
wrong field, wrong or missing token, an upload over the limit, broken JSON, bad base64) and
one good request; the server's resident memory (from /health) is read after every round.
The images are synthetic, so nothing from a dataset is needed.

    python benchmarks/serve_bad_inputs.py MODEL_DIR [--rounds 50] [--write]
"""

from __future__ import annotations

import argparse
import http.client
import io
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image
from report import machine, markdown_table, write_section
from serve_load import BOUNDARY, Server, get_json, synthetic_images

TOKEN = "bench-token"


def form(field: str, payload: bytes, name: str = "x.png") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"'
        "\r\nContent-Type: image/png\r\n\r\n"
    )
    return head.encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


def bomb() -> bytes:
    """A 30000 x 30000 PNG of a few KiB: 900 megapixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def requests(good: bytes) -> dict[str, tuple[bytes, dict, int]]:
    """Kind -> (body, extra headers, expected status)."""
    multipart = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    as_json = {"Content-Type": "application/json", **auth}
    return {
        "not an image": (form("file", b"hello, this is text"), {**multipart, **auth}, 422),
        "truncated PNG": (form("file", good[: len(good) // 2]), {**multipart, **auth}, 422),
        "30000 x 30000 PNG (bomb)": (form("file", bomb()), {**multipart, **auth}, 422),
        "empty body": (b"", {**multipart, **auth}, 422),
        "wrong field name": (form("image", good), {**multipart, **auth}, 422),
        "wrong token": (form("file", good), {**multipart, "Authorization": "Bearer nope"}, 401),
        "no token": (form("file", good), multipart, 401),
        "upload over 1 MiB": (form("file", good + b"\0" * 1_200_000), {**multipart, **auth}, 413),
        "broken JSON": (b'{"image": ', as_json, 422),
        "bad base64": (b'{"image": "%%%"}', as_json, 422),
        "good image (after the bad ones)": (form("file", good), {**multipart, **auth}, 200),
    }


def post(port: int, body: bytes, headers: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/predict", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    if args.rounds < 4:
        raise SystemExit("--rounds: at least 4 (memory is reported per quarter of the run)")

    with tempfile.TemporaryDirectory() as tmp:
        good = synthetic_images(Path(tmp), 256, 1)[0].read_bytes()
    kinds = requests(good)
    server = Server(args.model_dir, "torch", 8, ["--token", TOKEN, "--max-upload-mb", "1"])
    seen: dict[str, Counter] = {kind: Counter() for kind in kinds}
    messages: dict[str, str] = {}
    rss = []
    try:
        for _ in range(args.rounds):
            for kind, (body, headers, _) in kinds.items():
                status, text = post(server.port, body, headers)
                seen[kind][status] += 1
                messages.setdefault(kind, text[:120])
            rss.append(get_json(server.port, "/health")["rss_mb"])
        alive = server.process.poll() is None
    finally:
        server.stop()

    rows = [
        [
            kind,
            str(expected),
            ", ".join(f"{status} x{n}" for status, n in sorted(seen[kind].items())),
            messages[kind].replace("|", "/"),
        ]
        for kind, (_, _, expected) in kinds.items()
    ]
    wrong = {k: dict(c) for k, c in seen.items() if set(c) != {kinds[k][2]}}
    quarter = max(1, len(rss) // 4)
    text = "\n".join(
        [
            "## serve-bad-inputs: bad requests to `lookcloser serve`, round after round",
            "",
            f"One server (torch backend, `--token`, `--max-upload-mb 1`), {args.rounds} rounds; "
            "each round sends every request below once, in this order, on a new connection.",
            "",
            markdown_table(["request", "expected", "answers", "first answer's body"], rows),
            "",
            f"Answers other than expected: {wrong or 'none'}. Server still running at the end: "
            f"{'yes' if alive else 'NO'}. Resident memory (MiB, from /health) after rounds 1, "
            f"{quarter}, {2 * quarter}, {3 * quarter} and {len(rss)}: "
            + " / ".join(f"{rss[i - 1]:.0f}" for i in (1, quarter, 2 * quarter, 3 * quarter))
            + f" / {rss[-1]:.0f}; change over the last three quarters: "
            f"{rss[-1] - rss[quarter - 1]:+.1f} MiB.",
            "",
            f"Machine: {machine()}. Command: `python benchmarks/serve_bad_inputs.py MODEL_DIR "
            f"--rounds {args.rounds} --write`.",
        ]
    )
    print(text)
    if args.write:
        write_section("serve-bad-inputs", text)
    if wrong or not alive:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
