"""`make run` works for a newcomer, as the README's walkthrough uses it: the local stack starts,
a Web Push device from the local receiver subscribes, an event posted to the router wakes it, the
decrypted wake-up shows, each function says what it did, pushctl works against it, it survives
a restart, and Ctrl-C stops it quietly.

The stack is started as `make run` starts it (scripts/run_local.py, in its own process group), in
a temporary working directory with its own .local/ and on free ports, and stopped as Ctrl-C
stops it: SIGINT to the whole process group, which is what a terminal sends. Each test checks
nothing it started is left running.
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

#: Under pytest-xdist these run on one worker, one stack at a time: each stack is a dozen
#: processes, and two picking their blocks of ports at once could pick overlapping ones.
pytestmark = pytest.mark.xdist_group("local_stack")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0
FUNCTIONS = ("subscribe", "unsubscribe", "dispatch-fcm", "dispatch-apns", "dispatch-webpush",
             "cleanup-invalid-tokens")


def stack_ports(base: int) -> list[int]:
    """Every port of the stack: router, functions, receivers, web client, metrics."""
    return [base + i for i in (*range(7), 10, 11, 12, 13)] + [base + 1000 + i for i in range(1, 7)]


def free_base_port() -> int:
    """A base port whose whole block is free, below the ephemeral range (32768 and up on Linux),
    where a probe of a port not listening yet may connect to itself."""
    for _ in range(50):
        base = random.randrange(10000, 31000, 20)
        if all(_free(port) for port in stack_ports(base)):
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
    """One run of scripts/run_local.py, its output read line by line."""

    def __init__(self, cwd: Path, base: int) -> None:
        self.cwd = cwd
        self.base = base
        self.local = cwd / ".local"
        self.environment = {
            key: value for key, value in os.environ.items() if not key.startswith(("PUSH_", "K_SINK"))
        } | {"PUSH_LOCAL_BASE_PORT": str(base), "PUSH_LOCAL_DIR": str(self.local), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "run_local.py")],
            cwd=cwd, env=self.environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, matches: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line, printed so far or within ``timeout``, that ``matches``: processes
        print concurrently, so lines come in no set order."""
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

    def ready(self) -> str:
        """Wait for `Ready.`; the banner before it."""
        self.wait_for(lambda line: line.strip() == "Ready.", START_TIMEOUT, "the stack's Ready.")
        start = max(i for i, line in enumerate(self.seen) if "is running locally" in line)
        return "\n".join(self.seen[start:])

    def url(self, offset: int) -> str:
        return f"http://127.0.0.1:{self.base + offset}/"

    def run(self, *argv: object, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in the stack's working directory and environment, as a user's second shell."""
        return subprocess.run([str(a) for a in argv], cwd=self.cwd, env=self.environment,
                              capture_output=True, text=True, timeout=timeout)

    def ctrl_c(self) -> str:
        """Stop the stack as Ctrl-C in its terminal does; everything it printed from then on."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        left = _session_alive(self.process.pid)
        if left or self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        assert not left, "processes of the local stack were still running 30 s after Ctrl-C"
        assert self.process.returncode == 0, f"run_local.py exited {self.process.returncode}"
        time.sleep(0.2)  # the reader's last lines
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        self.seen += rest
        return "\n".join(rest)

    def kill(self) -> None:
        if self.process.poll() is None or _session_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)


def _session_alive(sid: int) -> bool:
    """Whether a process of the stack's session is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False


@pytest.fixture
def start_stack(tmp_path) -> Iterator[Callable[[], LocalStack]]:
    """Starts the stack in ``tmp_path``, on the same free ports each time (as a user restarts
    `make run`); whatever is still running at the end is killed."""
    base = free_base_port()
    started: list[LocalStack] = []

    def start() -> LocalStack:
        stack = LocalStack(tmp_path, base)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.kill()


def new_browser(stack: LocalStack) -> dict:
    """A browser's subscription, from the local Web Push receiver (the walkthrough's step 1)."""
    trust = ssl.create_default_context(cafile=stack.local / "webpush-ca.pem")
    device = httpx.post(f"https://localhost:{stack.base + 10}/subscriptions", json={}, verify=trust, timeout=10)
    assert device.status_code == 201
    return device.json()


def dev_token(stack: LocalStack) -> str:
    return stack.run(BIN / "pushctl", "dev-token", "--user", "1").stdout.strip()


def subscribe(stack: LocalStack, body: dict) -> dict:
    """The walkthrough's step 2: subscribed for user 1 with a token from pushctl."""
    answer = httpx.post(stack.url(1), json=body, headers={"Authorization": f"Bearer {dev_token(stack)}"}, timeout=10)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def post_event(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    return stack.run(sys.executable, REPO / "scripts" / "post_event.py", *args)


def function_line(stack: LocalStack, function: str, *words: str, timeout: float = 20) -> str:
    return stack.wait_for(
        lambda line: line.startswith(f"{function} ") and all(w in line for w in words), timeout,
        f"{function}'s line with {words}",
    )


def test_a_newcomer_follows_the_walkthrough_and_sees_what_happened(start_stack):
    stack = start_stack()
    banner = stack.ready()
    for port in stack_ports(stack.base):
        assert f":{port}" in banner, f"port {port} is not in the Ready banner"
    metrics = {stack.base + 1000 + i for i in range(1, 7)}
    listening = _listening()
    assert metrics <= {port for port, _ in listening}
    assert {address for port, address in listening if port in metrics} == {"127.0.0.1"}

    browser = new_browser(stack)
    subscribe(stack, {"provider": "webpush", "subscription": browser})
    line = function_line(stack, "subscribe", "subscribe webpush: created")
    assert browser["endpoint"] not in line and browser["keys"]["auth"] not in line
    # The production rules hold, with this receiver alone let through: not another local port,
    # not the same receiver by another name.
    for elsewhere in (f"https://localhost:{stack.base + 11}/push/x", f"https://127.0.0.1:{stack.base + 10}/push/x"):
        refused = httpx.post(
            stack.url(1), json={"provider": "webpush", "subscription": {**browser, "endpoint": elsewhere}},
            headers={"Authorization": f"Bearer {dev_token(stack)}"}, timeout=10,
        )
        assert refused.status_code == 400, elsewhere

    # Step 3: Echo's event. post_event.py shows each dispatcher's answer.
    posted = post_event(stack, "--user", "1", "--id", "first")
    assert posted.returncode == 0, posted.stdout + posted.stderr
    for function in ("dispatch-fcm", "dispatch-apns", "dispatch-webpush"):
        assert f"{function:<18} 202 done" in posted.stdout
    subscription_id = browser["endpoint"].rsplit("/", 1)[1]
    line = stack.wait_for(
        lambda text: text.startswith("webpush-receiver") and subscription_id in text, 20, "the wake-up"
    )
    pushed = json.loads(line.split("|", 1)[1])
    assert json.loads(pushed["payload"]) == {"type": "checkEchoV1"}
    assert pushed["topic"] == "checkEchoV1"

    # Each dispatcher's one line per event: a delivery, a user without devices, a redelivery.
    function_line(stack, "dispatch-webpush", "event first: 1 webpush device of 1 user: 1 delivered, 0 dead, "
                  "0 transient, 0 skipped (already served), 0 limited; answered 202 in")
    function_line(stack, "dispatch-fcm", "event first: no fcm devices for the event's 1 user; nothing sent")
    assert post_event(stack, "--user", "1", "--id", "first").returncode == 0
    function_line(stack, "dispatch-webpush", "event first: redelivery: 1 webpush device, all already served")

    # An event the dispatchers refuse: each answer shown, exit status 1, a line of its own.
    refused = post_event(stack, "--user", "1", "--message-type", "noSuchType")
    assert refused.returncode == 1
    for function in ("dispatch-fcm", "dispatch-apns", "dispatch-webpush"):
        assert f"{function:<18} 422 refused: invalid_data" in refused.stdout
    function_line(stack, "dispatch-apns", "refused: 422 invalid_data")

    # pushctl, run from the checkout, reads the stack's settings.
    apns_token = bodies.apns_token()
    subscribe(stack, bodies.apns(apns_token))
    sent = stack.run(BIN / "pushctl", "send-test", "--user", "1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "no fcm subscriptions for user 1" in sent.stdout
    assert "2 of 2 delivered" in sent.stdout
    listed = stack.run(BIN / "pushctl", "subscriptions", "--user", "1")
    assert [line.split()[1] for line in listed.stdout.splitlines()[1:]] == ["webpush", "apns"]
    assert apns_token not in listed.stdout
    assert not (stack.cwd / "push.sqlite3").exists()

    # With an Android device too, an event reaches the FCM and APNs receivers, which print what
    # they accepted, naming the device by its hash, never its token.
    fcm = bodies.fcm()
    subscribe(stack, fcm)
    assert post_event(stack, "--user", "1").returncode == 0
    for receiver, token in (("fcm-receiver", fcm["token"]), ("apns-receiver", apns_token)):
        digest = hashlib.sha256(token.encode()).hexdigest()[:16]
        line = stack.wait_for(lambda text, r=receiver, d=digest: text.startswith(r) and d in text, 20, receiver)
        assert json.loads(line.split("|", 1)[1])["message_type"] == "checkEchoV1"
        assert token not in line

    check_the_web_client_page(stack)
    assert "Traceback" not in stack.ctrl_c()


def check_the_web_client_page(stack: LocalStack) -> None:
    """The banner's web client address: the page is served, on an origin subscribe and
    unsubscribe allow (their preflight says so), and subscribe gives it the local VAPID key."""
    line = stack.wait_for(lambda text: text.strip().startswith("web client "), START_TIMEOUT, "the web client's address")
    page = httpx.URL(line.split()[-1])
    origin = f"{page.scheme}://{page.host}:{page.port}"
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
    assert key.json()["public_key"] == (stack.local / "vapid-public-key").read_text().strip()


def _listening() -> set[tuple[int, str]]:
    """(port, address) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            if len(address) == 8:
                address = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
            found.add((int(port, 16), address))
    return found


def test_a_device_still_works_after_a_restart_and_ctrl_c_stops_everything_quietly(start_stack):
    stack = start_stack()
    stack.ready()
    browser = new_browser(stack)
    subscribe(stack, {"provider": "webpush", "subscription": browser})
    subscribe(stack, bodies.apns())
    assert "Traceback" not in stack.ctrl_c()
    assert not any("Traceback" in line for line in stack.seen)

    again = start_stack()
    again.ready()
    assert post_event(again, "--user", "1").returncode == 0
    subscription_id = browser["endpoint"].rsplit("/", 1)[1]
    again.wait_for(lambda text: text.startswith("webpush-receiver") and subscription_id in text
                   and "checkEchoV1" in text, 20, "the wake-up after the restart")
    function_line(again, "dispatch-webpush", "1 delivered")
    function_line(again, "dispatch-apns", "1 delivered")
    sent = again.run(BIN / "pushctl", "send-test", "--user", "1")
    assert "2 of 2 delivered" in sent.stdout, sent.stdout + sent.stderr
    assert "Traceback" not in again.ctrl_c()
    assert not any("Traceback" in line for line in again.seen)


def test_a_busy_port_is_named_with_how_to_move_the_stack(tmp_path):
    base = free_base_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 3))
        holder.listen()
        stack = LocalStack(tmp_path, base)
        try:
            stack.process.wait(timeout=30)
        finally:
            stack.kill()
    time.sleep(0.2)
    output = "\n".join(stack.lines.queue)
    assert stack.process.returncode != 0
    assert f"{base + 3} (dispatch-fcm)" in output
    assert "PUSH_LOCAL_BASE_PORT=" in output
    assert "Traceback" not in output
