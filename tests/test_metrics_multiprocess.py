"""Metrics of a function run with several worker processes add up (prometheus-client's
multi-process mode, switched on by PROMETHEUS_MULTIPROC_DIR)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.cli import main as pushctl
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_workers_report_one_sum(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'push.sqlite3'}"
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    assert pushctl(["migrate"]) == 0
    (tmp_path / "metrics").mkdir()
    port, metrics_port = free_port(), free_port()
    environment = {
        **os.environ, "PUSH_DATABASE_URL": url, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "WORKERS": "2", "PUSH_METRICS_PORT": str(metrics_port), "PUSH_METRICS_ADDR": "127.0.0.1",
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
        for _ in range(6):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"", method="POST")
            assert urllib.request.urlopen(request, timeout=5).status == 202
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    line = 'push_requests_total{function="cleanup-invalid-tokens",method="POST",status_class="2xx"} 6.0'
    assert line in text
