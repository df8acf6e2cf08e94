"""Metrics of a function run as deployed: ``functions-framework --asgi``, where gunicorn imports
the function in its master process and forks the workers that serve requests. The metrics a
scrape sees must be the workers' (and, with several workers and PROMETHEUS_MULTIPROC_DIR,
prometheus-client's multi-process mode, their sum)."""
from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.cli import main as pushctl
from tests.deployed import deployed, free_port

CLEANUP_POSTS = 'push_requests_total{function="cleanup-invalid-tokens",method="POST",status_class="2xx"}'


@contextmanager
def deployed_cleanup(tmp_path: Path, monkeypatch, **environment: str) -> Iterator[tuple[int, int]]:
    """cleanup-invalid-tokens started as the Dockerfile starts it, on a migrated SQLite file;
    its port and its metrics port, once it answers."""
    url = f"sqlite:///{tmp_path / 'push.sqlite3'}"
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    assert pushctl(["migrate"]) == 0
    metrics_port = free_port()
    with deployed(
        "cleanup-invalid-tokens", PUSH_METRICS_PORT=str(metrics_port), PUSH_METRICS_ADDR="127.0.0.1", **environment
    ) as port:
        yield port, metrics_port


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
