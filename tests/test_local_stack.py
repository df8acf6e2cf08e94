"""`make run` works for a newcomer: the local stack starts, a Web Push device from the local
receiver subscribes, an event posted to the router wakes it, and the decrypted wake-up shows.

The stack is started as `make run` starts it (scripts/run_local.py, in its own process), in a
temporary working directory with its own .local/ and on free ports, then stopped with SIGTERM
as Ctrl-C would; the test checks nothing it started is left running.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import subscription_bodies as bodies

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 45.0


def free_base_port() -> int:
    """A base port whose whole block (router, functions, receivers, metrics) is free."""
    for _ in range(50):
        base = random.randrange(20000, 50000, 20)
        wanted = [base + i for i in (*range(7), 10, 11, 12, 13)] + [base + 1000 + i for i in range(1, 7)]
        if all(_free(port) for port in wanted):
            return base
    pytest.fail("no free block of ports found")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalStack:
    def __init__(self, process: subprocess.Popen, base: int, local: Path) -> None:
        self.process = process
        self.base = base
        self.local = local
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, matches: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line, among those seen so far or those to come, that ``matches``."""
        for line in self.seen:
            if matches(line):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if matches(line):
                return line
        tail = "\n".join(self.seen[-40:])
        pytest.fail(f"{what} did not show within {timeout:g} s; output so far:\n{tail}")

    def url(self, offset: int) -> str:
        return f"http://127.0.0.1:{self.base + offset}/"


@pytest.fixture
def local_stack(tmp_path) -> Iterator[LocalStack]:
    base = free_base_port()
    local = tmp_path / ".local"
    environment = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("PUSH_", "K_SINK"))
    } | {"PUSH_LOCAL_BASE_PORT": str(base), "PUSH_LOCAL_DIR": str(local), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "run_local.py")],
        cwd=tmp_path, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    stack = LocalStack(process, base, local)
    try:
        yield stack
    finally:
        process.send_signal(signal.SIGTERM)  # what Ctrl-C does: run_local stops its children
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        left = _group_alive(process.pid)
        if left:
            os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == 0, f"run_local.py exited {process.returncode}"
        assert not left, "processes of the local stack were still running after it stopped"


def _group_alive(pgid: int) -> bool:
    """Whether a process of the stack's session is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == pgid and state != "Z":
            return True
    return False


def test_a_newcomer_sees_a_web_push_wake_up_arrive(local_stack):
    local_stack.wait_for(lambda line: line.strip() == "Ready.", START_TIMEOUT, "the stack's Ready.")
    local = local_stack.local

    # A browser's subscription, from the local Web Push receiver.
    receiver = f"https://localhost:{local_stack.base + 10}"
    trust = ssl.create_default_context(cafile=local / "webpush-ca.pem")
    device = httpx.post(f"{receiver}/subscriptions", json={}, verify=trust, timeout=10)
    assert device.status_code == 201
    subscription = device.json()

    # Subscribed for user 1 with a token from pushctl, as the walkthrough does.
    token = subprocess.run(
        [BIN / "pushctl", "dev-token", "--user", "1", "--key", local / "auth-private.pem"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    answer = httpx.post(
        local_stack.url(1), json={"provider": "webpush", "subscription": subscription},
        headers={"Authorization": f"Bearer {token}"}, timeout=10,
    )
    assert answer.status_code == 201, answer.text
    # The production rules hold, with this receiver alone let through: not another local port,
    # not the same receiver by another name.
    for elsewhere in (f"https://localhost:{local_stack.base + 11}/push/x",
                      f"https://127.0.0.1:{local_stack.base + 10}/push/x"):
        refused = httpx.post(
            local_stack.url(1), json={"provider": "webpush", "subscription": {**subscription, "endpoint": elsewhere}},
            headers={"Authorization": f"Bearer {token}"}, timeout=10,
        )
        assert refused.status_code == 400, elsewhere
    # And an Android and an iOS device of the same user.
    devices = [bodies.fcm(), bodies.apns()]
    for body in devices:
        answer = httpx.post(local_stack.url(1), json=body,
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 201, answer.text

    # Echo's event, posted to the router, which routes it by knative/'s Triggers.
    posted = subprocess.run(
        [sys.executable, REPO / "scripts" / "post_event.py", "--user", "1"],
        env=os.environ | {"PUSH_LOCAL_BASE_PORT": str(local_stack.base)},
        check=False, capture_output=True, text=True, timeout=20,
    )
    assert posted.returncode == 0, posted.stdout + posted.stderr

    subscription_id = subscription["endpoint"].rsplit("/", 1)[1]
    line = local_stack.wait_for(
        lambda text: text.startswith("webpush-receiver") and subscription_id in text, 20, "the wake-up"
    )
    pushed = json.loads(line.split("|", 1)[1])
    assert json.loads(pushed["payload"]) == {"type": "checkEchoV1"}
    assert pushed["topic"] == "checkEchoV1"
    local_stack.wait_for(
        lambda text: "-> dispatch-webpush: HTTP 202" in text, 10, "the router's delivery report"
    )
    # The FCM and APNs receivers print theirs too, naming the device by its hash, never its token.
    for receiver, body in zip(("fcm-receiver", "apns-receiver"), devices):
        digest = hashlib.sha256(body["token"].encode()).hexdigest()[:16]
        line = local_stack.wait_for(
            lambda text, r=receiver, d=digest: text.startswith(r) and d in text, 20, receiver)
        pushed = json.loads(line.split("|", 1)[1])
        assert pushed["message_type"] == "checkEchoV1"
        assert body["token"] not in line


def test_a_newcomer_gets_a_web_client_page_its_functions_allow(local_stack):
    """The banner's web client address: the page is served, on an origin subscribe and
    unsubscribe allow (their preflight says so), and subscribe gives it the local VAPID key."""
    line = local_stack.wait_for(lambda text: text.strip().startswith("web client "), START_TIMEOUT, "the web client's address")
    page = httpx.URL(line.split()[-1])
    origin = f"{page.scheme}://{page.host}:{page.port}"
    local_stack.wait_for(lambda text: text.strip() == "Ready.", START_TIMEOUT, "the stack's Ready.")
    assert "PushManager" in httpx.get(str(page.copy_with(path="/app.js", query=None)), timeout=10).text
    for function in ("subscribe", "unsubscribe"):
        preflight = httpx.options(
            page.params[function], timeout=10,
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"},
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == origin
    key = httpx.get(page.params["subscribe"] + "/vapid-public-key", headers={"Origin": origin}, timeout=10)
    assert key.json()["public_key"] == (local_stack.local / "vapid-public-key").read_text().strip()
