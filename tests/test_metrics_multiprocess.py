"""Metrics of a function run as deployed: ``functions-framework --asgi``, where gunicorn imports
the function in its master process and forks the workers that serve requests. The metrics a
scrape sees must be the workers' (and, with several workers and PROMETHEUS_MULTIPROC_DIR,
prometheus-client's multi-process mode, their sum)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.cli import main as pushctl
from tests.conftest import REPO

CLEANUP_POSTS = 'push_requests_total{function="cleanup-invalid-tokens",method="POST",status_class="2xx"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def deployed_cleanup(tmp_path: Path, monkeypatch, **environment: str) -> Iterator[tuple[int, int]]:
    """cleanup-invalid-tokens started as the Dockerfile starts it, on a migrated SQLite file;
    its port and its metrics port, once it answers."""
    url = f"sqlite:///{tmp_path / 'push.sqlite3'}"
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    assert pushctl(["migrate"]) == 0
    port, metrics_port = free_port(), free_port()
    environment = {
        **os.environ, "PUSH_DATABASE_URL": url, "PUSH_METRICS_PORT": str(metrics_port),
        "PUSH_METRICS_ADDR": "127.0.0.1", **environment,
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "functions-framework"), "--asgi", "--target", "cleanup_invalid_tokens",
         "--source", str(REPO / "functions/cleanup-invalid-tokens/main.py"), "--host", "127.0.0.1", "--port", str(port)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the function did not start"
                time.sleep(0.1)
        yield port, metrics_port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def post_pings(port: int, count: int) -> None:
    for _ in range(count):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"", method="POST")
        assert urllib.request.urlopen(request, timeout=5).status == 202


def scrape_text(metrics_port: int) -> str:
    """The metrics page, retried for a moment: the worker starts its metrics server with its first
    request."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            assert time.monotonic() < deadline, "no metrics server answered"
            time.sleep(0.1)


def test_metrics_are_those_of_the_worker_that_served_the_requests(tmp_path, monkeypatch):
    """gunicorn's master imports the function, then forks the worker: a metrics server left in
    the master would count nothing, whatever the worker serves."""
    with deployed_cleanup(tmp_path, monkeypatch) as (port, metrics_port):
        post_pings(port, 3)
        text = scrape_text(metrics_port)
    assert f"{CLEANUP_POSTS} 3.0" in text


def test_two_workers_report_one_sum(tmp_path, monkeypatch):
    """One worker serves the metrics (the other's bind fails, harmlessly) and adds up both."""
    (tmp_path / "metrics").mkdir()
    with deployed_cleanup(
        tmp_path, monkeypatch, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"), WORKERS="2"
    ) as (port, metrics_port):
        post_pings(port, 6)
        text = scrape_text(metrics_port)
    assert f"{CLEANUP_POSTS} 6.0" in text
