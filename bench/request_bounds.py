"""What a request head costs a deployed function's worker: `python bench/request_bounds.py`.

Starts subscribe as its image starts it (the Dockerfile's CMD line: tests/deployed.py's
as_image) on a SQLite database of its own, once per variant, and prints one JSON line per
figure:

- ``head_flood_rss_growth``: the worker's VmRSS after minus before one connection sent a request
  line and then 300 MB of header lines (``lines``) or one 300 MB header value (``value``), and
  the seconds until the server's answer (or its closing the connection);
- ``health_cpu_per_request``: the worker's CPU (user + system) per ``GET /_/health`` over 3,000
  requests on one kept-alive connection: what the protocol itself costs a request.

Variants: ``bounded`` (the image: shared.http_protocol's protocol), ``httptools`` (uvicorn's own,
the image before issue 14), ``httptools+gunicorn-limits`` (the same with gunicorn's
``--limit-request-*`` options, which uvicorn's worker ignores) and ``h11`` (uvicorn's h11 worker,
whose ``h11_max_incomplete_event_size`` bounds a head at 16 KiB). Figures are for direction only
on a shared machine: run it on a quiet one for figures to publish.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.deployed import BIN, Deployed, as_image, process_tree, rss_mb  # noqa: E402

IMAGE_WORKER = "--worker-class shared.gunicorn_config.UvicornWorker"
VARIANTS = {
    "bounded": {},
    "httptools": {"GUNICORN_WORKER": "uvicorn_worker.UvicornWorker"},
    "httptools+gunicorn-limits": {
        "GUNICORN_WORKER": "uvicorn_worker.UvicornWorker",
        "GUNICORN_CMD_ARGS": "--limit-request-fields 100 --limit-request-field_size 8190",
    },
    "h11": {"GUNICORN_WORKER": "uvicorn_worker.UvicornH11Worker"},
}
FLOOD_BYTES = 300 * 1024 * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(function: Deployed, shape: str) -> tuple[float, float, str]:
    """RSS growth of the worker (MB), seconds to the answer, and the answer's status line."""
    worker = function.worker_pid
    before = rss_mb(worker)
    started = time.perf_counter()
    with function.connect(timeout=300) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: bench\r\n" + (b"X-Big: " if shape == "value" else b""))
        piece = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 64 if shape == "lines" else b"a" * 65536
        try:
            for _ in range(FLOOD_BYTES // len(piece)):
                sock.sendall(piece)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the server stopped reading
        try:
            status = sock.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError as exc:
            status = type(exc).__name__
    seconds = time.perf_counter() - started
    time.sleep(1)
    return rss_mb(worker) - before, seconds, status or "closed"


def health_cpu(function: Deployed, requests: int = 3000) -> float:
    worker = function.worker_pid
    with function.connect() as sock:
        request = b"GET /_/health HTTP/1.1\r\nHost: bench\r\n\r\n"
        start = cpu_seconds(worker)
        for _ in range(requests):
            sock.sendall(request)
            answer = b""
            while b"}" not in answer:  # {"status":"ok"}
                answer += sock.recv(4096)
        return (cpu_seconds(worker) - start) / requests


def emit(name: str, value: float, unit: str, **parameters) -> None:
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit, "parameters": parameters}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="request-bounds-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSH_", "GUNICORN_"))}
        env["PUSH_DATABASE_URL"] = f"sqlite:///{work / 'push.sqlite3'}"
        env["PYTHONPATH"] = str(REPO)
        subprocess.run([BIN / "pushctl", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([BIN / "pushctl", "dev-keys", work], env=env, check=True, stdout=subprocess.DEVNULL)
        env["PUSH_AUTH_PUBLIC_KEY"] = str(work / "auth-public.pem")
        for variant in args.variants.split(","):
            settings = dict(VARIANTS[variant])
            worker = settings.pop("GUNICORN_WORKER", None)
            for shape in ("lines", "value"):
                with as_image("subscribe", env | settings, work / f"{variant}.log",
                              replace={IMAGE_WORKER: f"--worker-class {worker}"} if worker else None) as function:
                    growth, seconds, status = flood(function, shape)
                    emit("head_flood_rss_growth", growth, "MB", variant=variant, shape=shape,
                         flood_mb=FLOOD_BYTES >> 20, seconds=round(seconds, 1), answer=status)
                    if shape == "lines":
                        emit("health_cpu_per_request", health_cpu(function) * 1e6, "us", variant=variant,
                             worker_processes=len(process_tree(function.process.pid)) - 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
