"""Run the whole function set on this machine: `make run`.

It starts, each in its own process and all on 127.0.0.1:

- local receivers standing in for the push providers (the wire-protocol fakes of fakes/): a Web
  Push service that decrypts and prints every wake-up it receives, an FCM and an APNs server that
  print every wake-up they accept (message type, the device's hash, the headers that matter;
  never the device token). The dispatchers are configured for them: VAPID keys, a service-account
  JSON and an APNs signing key are made in .local/. A provider whose settings you have set
  yourself (PUSH_VAPID_PRIVATE_KEY, PUSH_FCM_CREDENTIALS, PUSH_APNS_KEY, or their _FILE forms) is
  left to them. Web Push endpoints follow the production rules, with the local receiver alone let
  through (PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS);
- the six functions, each in its own functions-framework process (ASGI), as deployed, on SQLite
  in .local/;
- the event router (scripts/local_router.py), standing in for the Knative broker: it routes
  events by the Triggers in knative/;
- the reference web client (examples/web/, docs/web-client.md), served as files on its own origin,
  which subscribe and unsubscribe allow (PUSH_CORS_ALLOWED_ORIGINS).

Every process's output is shown prefixed with its name (the functions' JSON log lines as their
level and message). Ctrl-C (or SIGTERM) stops everything. The settings the functions were given
are written to .local/local.env, where pushctl run from the repository finds them
(shared/localenv.py).

Ports, all on 127.0.0.1: the router on PUSH_LOCAL_BASE_PORT (default 8080), the functions on the
next six (8081 to 8086), the receivers on +10 to +12 (8090 Web Push, 8091 FCM, 8092 APNs), the
web client on +13 (8093), metrics on +1001 to +1006 (9081 to 9086). A port in use stops the
start, naming it. PUSH_LOCAL_DIR moves .local/ elsewhere.
"""
from __future__ import annotations

import http.client
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # shared/, when the package is not installed

from shared.localenv import FILE_NAME, write_settings  # noqa: E402 - after the path is set

BIN = Path(sys.executable).parent
PYTHON = sys.executable

FUNCTIONS = (
    "subscribe",
    "unsubscribe",
    "dispatch-fcm",
    "dispatch-apns",
    "dispatch-webpush",
    "cleanup-invalid-tokens",
)
RECEIVER_OFFSETS = {"webpush": 10, "fcm": 11, "apns": 12}
WEB_CLIENT_OFFSET = 13
METRICS_OFFSET = 1001
START_TIMEOUT = 60.0


def base_port() -> int:
    return int(os.environ.get("PUSH_LOCAL_BASE_PORT") or 8080)


def function_ports(base: int) -> dict[str, int]:
    return {name: base + 1 + index for index, name in enumerate(FUNCTIONS)}


def local_dir() -> Path:
    return Path(os.environ.get("PUSH_LOCAL_DIR") or REPO / ".local").resolve()


def metrics_on(environment: dict[str, str]) -> bool:
    return environment.get("PUSH_METRICS_PORT") != "off"


def wanted_ports(base: int, receivers: list[str], metrics: bool) -> dict[int, str]:
    """Every port the stack will listen on, and what for."""
    ports = {base: "the router"}
    ports.update({port: name for name, port in function_ports(base).items()})
    ports.update({base + RECEIVER_OFFSETS[name]: f"the {name} receiver" for name in receivers})
    ports[base + WEB_CLIENT_OFFSET] = "the web client"
    if metrics:
        ports.update({base + METRICS_OFFSET + i: f"{name}'s metrics" for i, name in enumerate(FUNCTIONS)})
    return ports


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the servers bind: a port that only has connections closing (TIME_WAIT) is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def check_ports(base: int, receivers: list[str], metrics: bool) -> None:
    """Stop before starting anything when a port is taken, saying which and how to move."""
    busy = {port: what for port, what in wanted_ports(base, receivers, metrics).items() if not port_free(port)}
    if not busy:
        return
    taken = ", ".join(f"{port} ({what})" for port, what in sorted(busy.items()))
    hint = "move the whole stack with PUSH_LOCAL_BASE_PORT"
    for candidate in range(base + 10000, 65535 - METRICS_OFFSET - len(FUNCTIONS), 1000):
        if all(port_free(port) for port in wanted_ports(candidate, receivers, metrics)):
            hint = f"move the whole stack: PUSH_LOCAL_BASE_PORT={candidate} make run"
            break
    raise SystemExit(
        f"port(s) in use on 127.0.0.1: {taken}. Stop what holds them (is `make run` already "
        f"running?), or {hint} (every port then moves by the same amount)."
    )


def user_configured(*names: str) -> bool:
    return any(os.environ.get(name) or os.environ.get(f"{name}_FILE") for name in names)


class Stack:
    """The processes started, their output relayed with a name prefix."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.banners: dict[str, queue.Queue[str]] = {}
        self.relays: list[threading.Thread] = []
        self.print_lock = threading.Lock()

    def start(self, name: str, argv: list[str], env: dict[str, str], banner: bool = False) -> None:
        process = subprocess.Popen(
            [str(a) for a in argv], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self.processes[name] = process
        if banner:
            self.banners[name] = queue.Queue()
        relay = threading.Thread(target=self._relay, args=(name, process), daemon=True)
        relay.start()
        self.relays.append(relay)

    def _relay(self, name: str, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        first = True
        for line in process.stdout:
            if first and name in self.banners:
                self.banners[name].put(line)
            first = False
            self.say(f"{name:<22} | {readable(line.rstrip())}")

    def say(self, text: str) -> None:
        with self.print_lock:
            print(text, flush=True)

    def banner(self, name: str) -> dict:
        """The JSON line a receiver prints first: where it is and what it made."""
        try:
            return json.loads(self.banners[name].get(timeout=START_TIMEOUT))
        except queue.Empty:
            raise SystemExit(f"{name} did not start within {START_TIMEOUT:g} s") from None

    def failed(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self) -> None:
        """SIGTERM to each process still running, SIGKILL to those still running 10 s later;
        then the last of their output. A second Ctrl-C meanwhile does not cut this short."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for relay in self.relays:
            relay.join(timeout=2)


def readable(line: str) -> str:
    """A function's JSON log line as its level and message; any other line as it is."""
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or not {"level", "message"} <= record.keys():
        return line
    return f"{record['level']:<7} {record['message']}"


def receivers_to_start() -> list[str]:
    """The Web Push receiver always starts (it is where the walkthrough's browser subscribes);
    FCM's and APNs' only when the user has not configured that provider."""
    started = ["webpush"]
    if not user_configured("PUSH_FCM_CREDENTIALS"):
        started.append("fcm")
    if not user_configured("PUSH_APNS_KEY"):
        started.append("apns")
    return started


def start_receivers(
    stack: Stack, environment: dict[str, str], local: Path, base: int, receivers: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Start ``receivers`` and point the dispatchers at them: where each listens, and the
    settings made for the dispatchers (those the user has not set)."""
    settings: dict[str, str] = {}
    where: dict[str, str] = {}
    vapid_public = None
    if not user_configured("PUSH_VAPID_PRIVATE_KEY"):
        vapid_public = local_vapid_keys(local, settings)
        settings["PUSH_VAPID_SUBJECT"] = "mailto:push-dev@localhost"
    webpush_ca = local / "webpush-ca.pem"
    argv = [PYTHON, "-m", "fakes.webpush", "--port", base + RECEIVER_OFFSETS["webpush"],
            "--ca-file", webpush_ca, "--print-pushes",
            "--state-file", local / "webpush-subscriptions.json"]
    if vapid_public:
        argv += ["--application-server-key", vapid_public]
    stack.start("webpush-receiver", argv, environment, banner=True)
    if "fcm" in receivers:
        stack.start("fcm-receiver", [
            PYTHON, "-m", "fakes.fcm", "--port", base + RECEIVER_OFFSETS["fcm"],
            "--ca-out", local / "fcm-ca.pem", "--credentials-out", local / "fcm-service-account.json",
            "--print-pushes",
        ], environment, banner=True)
    if "apns" in receivers:
        stack.start("apns-receiver", [
            PYTHON, "-m", "fakes.apns", "--port", base + RECEIVER_OFFSETS["apns"],
            "--ca-out", local / "apns-ca.pem", "--key-out", local / "apns-key.p8",
            "--print-pushes",
            # A key id of its own per start: the receiver makes a new key each time, and the
            # provider token signed with the last one is kept in the database (provider_tokens).
            "--key-id", f"LOCAL{secrets.token_hex(3)[:5].upper()}",
        ], environment, banner=True)

    webpush = stack.banner("webpush-receiver")
    settings["PUSH_WEBPUSH_CA_FILE"] = str(webpush_ca)
    # The production rules for Web Push endpoints (push services only, docs: Hardening), with
    # exactly this receiver let through: subscribe refuses every other local endpoint.
    settings["PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS"] = webpush["origin"].removeprefix("https://")
    where["webpush-receiver"] = f"{webpush['origin']}   new device: POST /subscriptions (CA {webpush_ca})"
    if "fcm" in receivers:
        fcm = stack.banner("fcm-receiver")
        settings.update({
            "PUSH_FCM_CREDENTIALS": fcm["credentials_path"],
            "PUSH_FCM_ENDPOINT": fcm["endpoint"],
            "PUSH_FCM_CA_FILE": fcm["ca_path"],
        })
        where["fcm-receiver"] = fcm["endpoint"]
    else:
        where["fcm"] = "yours (PUSH_FCM_CREDENTIALS is set)"
    if "apns" in receivers:
        apns = stack.banner("apns-receiver")
        settings.update({
            "PUSH_APNS_KEY": apns["key_path"],
            "PUSH_APNS_KEY_ID": apns["key_id"],
            "PUSH_APNS_TEAM_ID": apns["team_id"],
            "PUSH_APNS_PRODUCTION_URL": apns["base_url"],
            "PUSH_APNS_SANDBOX_URL": apns["base_url"],
            "PUSH_APNS_CA_FILE": apns["ca_path"],
        })
        where["apns-receiver"] = apns["base_url"]
    else:
        where["apns"] = "yours (PUSH_APNS_KEY is set)"
    made = {name: value for name, value in settings.items() if name not in environment}
    environment.update(made)
    return where, made


def local_vapid_keys(local: Path, settings: dict[str, str]) -> str:
    """The local VAPID key pair (made once, kept in .local/); returns the public key."""
    private_path, public_path = local / "vapid-private-key", local / "vapid-public-key"
    if not (private_path.exists() and public_path.exists()):
        from shared.vapid import generate_vapid_keys

        keys = generate_vapid_keys()
        private_path.write_text(keys.private_key + "\n")
        private_path.chmod(0o600)
        public_path.write_text(keys.public_key + "\n")
    settings["PUSH_VAPID_PRIVATE_KEY"] = str(private_path)
    return public_path.read_text().strip()


def wait_until_ready(stack: Stack, urls: dict[str, str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    waiting = dict(urls)
    while waiting:
        if stack.failed():
            raise SystemExit(f"stopped: {', '.join(stack.failed())} exited while starting")
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready after {START_TIMEOUT:g} s: {', '.join(waiting)}")
        for name, url in list(waiting.items()):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        del waiting[name]
            except (OSError, http.client.HTTPException):
                # Not listening yet; or, on a port in the ephemeral range, the probe connected
                # to itself and read its own request back (BadStatusLine).
                pass
        time.sleep(0.2)


def ready_banner(base: int, metrics: bool, receivers: dict[str, str], local: Path) -> str:
    """What is where: every port the stack listens on, and what to try first."""
    lines = [f"  {'router (the broker)':<24} http://127.0.0.1:{base}/"]
    for index, (name, port) in enumerate(function_ports(base).items()):
        metrics_url = f"   metrics http://127.0.0.1:{base + METRICS_OFFSET + index}/metrics" if metrics else ""
        lines.append(f"  {name:<24} http://127.0.0.1:{port}/{metrics_url}")
    lines += [f"  {name:<24} {url}" for name, url in receivers.items()]
    moved = local != (REPO / ".local").resolve()
    return (
        "\npush-functions is running locally, on 127.0.0.1:\n" + "\n".join(lines)
        + f"\n\nSettings (read by pushctl run from here): {local / FILE_NAME}"
        + (f"\nIn another shell, first:  export PUSH_LOCAL_DIR={local}" if moved else "")
        + "\nA token for user 1:  .venv/bin/pushctl dev-token --user 1"
        + "\nA notification:      .venv/bin/python scripts/post_event.py --user 1"
        + "\nWalkthrough: README.md. Ctrl-C stops everything.\nReady.\n"
    )


def interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM and a closed terminal stop as cleanly as Ctrl-C. SIGINT is set too: a process
    # started in the background by a shell inherits it ignored, and would outlive its children.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    stack = Stack()
    try:
        return run(stack)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def run(stack: Stack) -> int:
    local = local_dir()
    local.mkdir(parents=True, exist_ok=True)
    base = base_port()
    ports = function_ports(base)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    receivers = receivers_to_start()
    check_ports(base, receivers, metrics_on(environment))
    made = {
        "PUSH_DATABASE_URL": f"sqlite:///{local / 'push.sqlite3'}",
        "PUSH_AUTH_PUBLIC_KEY": str(local / "auth-public.pem"),
    }
    made = {name: value for name, value in made.items() if name not in environment}
    environment.update(made)
    web_port = base + WEB_CLIENT_OFFSET
    environment.setdefault("PUSH_CORS_ALLOWED_ORIGINS", f"http://127.0.0.1:{web_port},http://localhost:{web_port}")
    for step in (["dev-keys", local], ["migrate"]):
        if subprocess.run([BIN / "pushctl", *step], env=environment, cwd=REPO).returncode != 0:
            raise SystemExit(f"stopped: `pushctl {step[0]}` failed, saying why above")

    where, provider_settings = start_receivers(stack, environment, local, base, receivers)
    write_settings(local / FILE_NAME, {
        **made, **provider_settings,
        # The database the functions use, even one of the user's: pushctl must find the same.
        "PUSH_DATABASE_URL": environment["PUSH_DATABASE_URL"], "PUSH_LOCAL_BASE_PORT": str(base),
    })
    for index, name in enumerate(FUNCTIONS):
        source = REPO / "functions" / name / "main.py"
        function_environment = dict(environment)
        if metrics_on(environment):
            function_environment["PUSH_METRICS_PORT"] = str(base + METRICS_OFFSET + index)
            function_environment["PUSH_METRICS_ADDR"] = "127.0.0.1"
        stack.start(name, [
            BIN / "functions-framework", "--asgi", "--target", name.replace("-", "_"),
            "--source", source, "--host", "127.0.0.1", "--port", ports[name],
        ], function_environment)
    stack.start("router", [
        PYTHON, REPO / "scripts" / "local_router.py", "--port", base,
        "--manifests", REPO / "knative",
        *[arg for name in FUNCTIONS for arg in ("--service", f"{name}=http://127.0.0.1:{ports[name]}/")],
    ], environment)
    stack.start("web-client", [
        PYTHON, "-m", "http.server", web_port, "--bind", "127.0.0.1", "--directory", REPO / "examples" / "web",
    ], environment)
    wait_until_ready(stack, {
        **{name: f"http://127.0.0.1:{port}/readyz" for name, port in ports.items()},
        "router": f"http://127.0.0.1:{base}/healthz",
        "web-client": f"http://127.0.0.1:{web_port}/",
    })
    where["web client"] = (
        f"http://127.0.0.1:{web_port}/?subscribe=http://127.0.0.1:{ports['subscribe']}"
        f"&unsubscribe=http://127.0.0.1:{ports['unsubscribe']}&standin=https://localhost:{base + RECEIVER_OFFSETS['webpush']}"
    )
    stack.say(ready_banner(base, metrics_on(environment), where, local))
    while not stack.failed():
        time.sleep(0.5)
    stack.say(f"stopped: {', '.join(stack.failed())} exited")
    return 1


if __name__ == "__main__":
    sys.exit(main())
