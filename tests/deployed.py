"""Functions run as deployed, in a process of their own: ``functions-framework --asgi`` (gunicorn
with uvicorn's worker, the function imported by the master) on 127.0.0.1, for the tests whose
callers must reach them over real HTTP: a browser, a metrics scrape."""
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

from tests.conftest import REPO

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def deployed(function: str, **environment: str) -> Iterator[int]:
    """``function`` serving on a free port with this process's environment and ``environment``
    on top; its port once it answers its health path. Stopped (its whole process group) after."""
    with deployed_all({function: environment}) as ports:
        yield ports[function]


@contextmanager
def deployed_all(functions: dict[str, dict[str, str]]) -> Iterator[dict[str, int]]:
    """Several functions at once (started together: each start is mostly imports), each with
    its own extra environment; their ports once all answer."""
    started: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for function, environment in functions.items():
            port = free_port()
            started[function] = subprocess.Popen(
                [str(Path(sys.executable).parent / "functions-framework"), "--asgi",
                 "--target", function.replace("-", "_"), "--source", str(REPO / "functions" / function / "main.py"),
                 "--host", "127.0.0.1", "--port", str(port)],
                env={**os.environ, **environment}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # gunicorn forks its worker: stop the whole group
            ), port
        deadline = time.monotonic() + START_TIMEOUT
        for function, (process, port) in started.items():
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_/health", timeout=1)
                    break
                except OSError:
                    assert process.poll() is None, f"{function} exited while starting"
                    assert time.monotonic() < deadline, f"{function} did not start"
                    time.sleep(0.1)
        yield {function: port for function, (_, port) in started.items()}
    finally:
        for process, _ in started.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process, _ in started.values():
            process.wait(timeout=10)
