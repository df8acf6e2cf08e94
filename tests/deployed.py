"""Functions run as deployed, in processes of their own on 127.0.0.1, for the tests whose callers
must reach them over real HTTP. Two ways to start one:

- :func:`deployed` and :func:`deployed_all`: ``functions-framework --asgi`` (gunicorn with
  uvicorn's worker, the function imported by the master): a browser, a metrics scrape;
- :func:`as_image`: the image's own command line, the Dockerfile's ``CMD`` (gunicorn with the
  worker and HTTP protocol of shared/gunicorn_config.py), run by a shell as the image runs it and
  as bench/run.py runs it: for what only the image's server does (the bounds of its HTTP
  protocol), with the worker at hand to measure.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Not tests.conftest's: bench/ imports this module too.
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0
IMAGE_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop each process's whole group (gunicorn forks its worker; a SIGKILLed master alone
    would leave it behind), SIGKILL for a group still there after 15 s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- functions-framework --asgi ---------------------------------------------------------------


@contextlib.contextmanager
def deployed(function: str, **environment: str) -> Iterator[int]:
    """``function`` serving on a free port with this process's environment and ``environment``
    on top; its port once it answers its health path. Stopped (its whole process group) after."""
    with deployed_all({function: environment}) as ports:
        yield ports[function]


@contextlib.contextmanager
def deployed_all(functions: dict[str, dict[str, str]]) -> Iterator[dict[str, int]]:
    """Several functions at once (started together: each start is mostly imports), each with
    its own extra environment; their ports once all answer."""
    started: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for function, environment in functions.items():
            port = free_port()
            started[function] = subprocess.Popen(
                [str(BIN / "functions-framework"), "--asgi",
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
        _stop([process for process, _ in started.values()])


# --- the image's command ------------------------------------------------------------------------


def deployed_command() -> str:
    """The Dockerfile's CMD (shell form): how every function's image starts its function."""
    commands = [line[len("CMD "):] for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("CMD ")]
    if len(commands) != 1:
        raise RuntimeError("expected one single-line CMD in the Dockerfile")
    return commands[0]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            child_pids = [int(child) for child in children.read().split()]
    except OSError:
        return [pid]
    return [pid] + [p for child in child_pids for p in process_tree(child)]


def rss_mb(pid: int) -> float:
    """The resident set size of one process, in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Deployed:
    """A function started as its image starts it: gunicorn's master (the shell exec'd into it)
    and its one worker."""

    process: subprocess.Popen
    port: int

    @property
    def worker_pid(self) -> int:
        pids = process_tree(self.process.pid)
        assert len(pids) >= 2, "gunicorn has no worker"
        return pids[-1]

    def worker_rss_mb(self) -> float:
        return rss_mb(self.worker_pid)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def request(self, method: str, path: str = "/", body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """One request on a connection of its own: the status and the body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()


@contextlib.contextmanager
def as_image(function: str, environment: Mapping[str, str], log: Path,
             replace: Mapping[str, str] | None = None) -> Iterator[Deployed]:
    """``function`` started by the image's command with ``environment`` (its settings; the
    metrics port is set free), serving once its readiness path answers 2xx; stopped after.
    Its output goes to ``log``. ``replace`` swaps parts of the command (a benchmark comparing
    worker classes); tests run it as it is."""
    port = free_port()
    env = {
        **environment, "FUNCTION": function, "PORT": str(port), "PUSH_METRICS_PORT": str(free_port()),
        "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")])),
    }
    env.pop("WORKERS", None)
    command = deployed_command().replace("/app/functions/", f"{REPO}/functions/")
    for old, new in (replace or {}).items():
        assert old in command, f"{old!r} is not in the image's command"
        command = command.replace(old, new)
    with open(log, "ab") as output:
        process = subprocess.Popen(["sh", "-c", command], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=output, start_new_session=True)
    running = Deployed(process, port)
    try:
        deadline = time.monotonic() + IMAGE_START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{function} exited while starting: {log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if 200 <= running.request("GET", "/readyz")[0] < 300:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{function} not ready after {IMAGE_START_TIMEOUT:g} s")
            time.sleep(0.1)
        yield running
    finally:
        _stop([process])
