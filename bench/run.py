"""push-functions benchmarks: `python bench/run.py [--quick] [--only NAME[,NAME]]`.

Starts the provider fakes (fakes/, standalone, on a realistic network: --rtt-ms of round trip,
default 50, on every answer and handshake, connections recycled every --recycle-after streams,
default 1,000), MariaDB's `push_bench` database seeded with subscriptions, each function exactly
as deployed (the Dockerfile's command), and a load generator in another process
(bench/loadgen.py); prints one JSON line per figure on stdout:

    {"name": ..., "value": ..., "unit": ..., "provider": ..., "parameters": {...}}

Progress goes to stderr. Nothing here asserts a time: the figures are compared with the targets
in bench/README.md by people. See bench/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.deployed import deployed_command  # noqa: E402  (the one reading of the Dockerfile's CMD)
BIN = Path(sys.executable).parent
PYTHON = sys.executable

DB_NAME = os.environ.get("PUSH_BENCH_DATABASE", "push_bench")
"""The database the run creates and truncates; another name lets a second run go on beside
this one (sharing the CPU, so for CPU-per-operation figures only)."""
DB_SERVER = os.environ.get("PUSH_BENCH_MARIADB", "mysql+pymysql://root@127.0.0.1:3306")
DATABASE_URL = f"{DB_SERVER}/{DB_NAME}?charset=utf8mb4"
TOPIC = "org.wikimedia.wikipedia"
PROVIDERS = ("apns", "fcm", "webpush")
FUNCTIONS = ("subscribe", "unsubscribe", "dispatch-fcm", "dispatch-apns", "dispatch-webpush",
             "cleanup-invalid-tokens")
SECTIONS = ("fakes", "clients", "dispatch", "latency", "coldstart", "subscribe", "flush", "scale")
HOT_USERS = 1000
"""Users the load targets; each has 3 devices of every provider (9,000 rows). Filler rows of
other users bring the table to the size a figure names (10k or 1M)."""
DEVICES_PER_USER = 3
SOLO_USERS = 1000
"""Users with one device of every provider ("solo0"...), for events of 1 user x 1 device."""
WEBPUSH_SUBSCRIPTIONS = HOT_USERS * DEVICES_PER_USER + SOLO_USERS
SQLITE_PATH: Path | None = None
"""With --database sqlite: the functions' SQLite file (in the work directory)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUNS = 3
"""Runs per dispatch figure: each figure gives min, median and max."""
NETWORK = {"rtt_ms": 50.0, "recycle_after": 1000}
"""The fakes' network (--rtt-ms, --recycle-after), reported with every dispatch figure."""
PROFILE_DIR: Path | None = None
"""With --profile DIR: py-spy records the function's worker over every measured window, and
each provider client alone (raw collapsed stacks, one file per run; bench/profile_summary.py
summarises them)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


CONCURRENCY = {1: 16, 100: 4}
"""Events in flight at once (closed loop) for 1-user and 100-user events; --concurrency changes it."""
SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 3), (100, 3))
"""Users x devices per event of the dispatch figures (--shapes)."""
LATENCY_RATE = 500.0
"""Events/s of 1 user x 3 devices offered for the latency figures (--latency-rate)."""
SOURCE = REPO
"""The checkout whose functions and shared package run (--source; the command is this one's)."""
DATABASE_KIND = "mariadb"
COMMAND: str | None = None
"""With --command: the shell command starting a function instead of the Dockerfile's CMD (an
experiment with another server; shown in every figure)."""
"""The functions' database: ``mariadb`` (DB_NAME on DB_SERVER) or ``sqlite`` (--database)."""
EXTRA_ENV: dict[str, str] = {}
"""Settings given with --env, reported with every figure."""


def emit(name: str, value: float | None, unit: str, provider: str | None = None, **parameters) -> None:
    parameters.setdefault("database", DATABASE_KIND)
    if SOURCE != REPO:
        parameters["source"] = str(SOURCE)
    if COMMAND:
        parameters["command"] = COMMAND
    if EXTRA_ENV:
        parameters["env"] = EXTRA_ENV
    line = {"name": name, "value": value, "unit": unit, "provider": provider, "parameters": parameters}
    print(json.dumps(line), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes -------------------------------------------------------------------------------------

class Procs:
    """Every process the benchmark started, stopped (by pid) at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[subprocess.Popen] = []

    def spawn(self, args: list[str], name: str, env: dict | None = None, cwd: Path = REPO,
              **kwargs) -> subprocess.Popen:
        stderr = open(self.work / f"{name}.stderr", "ab")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stderr=stderr, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the process and its workers
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.started)):
            self.stop(proc)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in children(pid):
        out.extend(tree(child))
    return out


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes (all their threads)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_times(pids))


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def read_json_line(proc: subprocess.Popen) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args} exited before announcing itself")
    return json.loads(line)


# -- fakes -------------------------------------------------------------------------------------------

class Fakes:
    def __init__(self, procs: Procs, work: Path) -> None:
        self.procs, self.work = procs, work

    def start(self) -> None:
        w = self.work
        log(f"starting the provider fakes (fakes/, standalone; {NETWORK})")
        network = ["--rtt-ms", str(NETWORK["rtt_ms"])]
        if NETWORK["recycle_after"]:
            network += ["--recycle-after", str(NETWORK["recycle_after"])]
        self.apns_proc = self.procs.spawn(
            [PYTHON, "-m", "fakes.apns", "--ca-out", str(w / "apns-ca.pem"),
             "--key-out", str(w / "apns.p8"), "--key-id", f"BENCH{secrets.token_hex(3).upper()}",
             *network], "fake-apns", stdout=subprocess.PIPE, text=True)
        self.fcm_proc = self.procs.spawn(
            [PYTHON, "-m", "fakes.fcm", "--ca-out", str(w / "fcm-ca.pem"),
             "--credentials-out", str(w / "fcm-sa.json"), *network],
            "fake-fcm", stdout=subprocess.PIPE, text=True)
        webpush_http1 = ["--http1-only"] if NETWORK.get("webpush_http1_only") else []
        self.webpush_proc = self.procs.spawn(
            [PYTHON, "-m", "fakes.webpush", "--ca-file", str(w / "webpush-ca.pem"),
             "--subscriptions", str(WEBPUSH_SUBSCRIPTIONS), "--max-records", "1",
             *network, *webpush_http1], "fake-webpush", stdout=subprocess.PIPE, text=True)
        self.apns = read_json_line(self.apns_proc)
        self.fcm = read_json_line(self.fcm_proc)
        self.webpush = read_json_line(self.webpush_proc)
        self.webpush_subscriptions = [read_json_line(self.webpush_proc)
                                      for _ in range(WEBPUSH_SUBSCRIPTIONS)]

    def proc(self, provider: str) -> subprocess.Popen:
        return {"apns": self.apns_proc, "fcm": self.fcm_proc, "webpush": self.webpush_proc}[provider]

    def pid(self, provider: str) -> int:
        return self.proc(provider).pid

    def counts(self, provider: str) -> dict:
        """What the fake has answered so far (fakes/server.py, "Counting"): it prints its
        counts on SIGUSR1."""
        proc = self.proc(provider)
        os.kill(proc.pid, signal.SIGUSR1)
        while True:
            line = read_json_line(proc)
            if "counts" in line:
                return line["counts"]


# -- environment -----------------------------------------------------------------------------------

def make_environment(work: Path, fakes: Fakes) -> dict[str, str]:
    """The functions' settings as a deployment gives them: variables and secret files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from shared.vapid import generate_vapid_keys

    auth_key = ec.generate_private_key(ec.SECP256R1())
    (work / "auth-private.pem").write_bytes(auth_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (work / "auth-public.pem").write_bytes(auth_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (work / "vapid-private-key").write_text(generate_vapid_keys().private_key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    env.update({
        "PUSH_DATABASE_URL": DATABASE_URL,
        "PUSH_AUTH_PUBLIC_KEY": str(work / "auth-public.pem"),
        "PUSH_APNS_KEY": fakes.apns["key_path"],
        "PUSH_APNS_KEY_ID": fakes.apns["key_id"],
        "PUSH_APNS_TEAM_ID": fakes.apns["team_id"],
        "PUSH_APNS_PRODUCTION_URL": fakes.apns["base_url"],
        "PUSH_APNS_SANDBOX_URL": fakes.apns["base_url"],
        "PUSH_APNS_CA_FILE": fakes.apns["ca_path"],
        "PUSH_FCM_CREDENTIALS": fakes.fcm["credentials_path"],
        "PUSH_FCM_ENDPOINT": fakes.fcm["endpoint"],
        "PUSH_FCM_CA_FILE": fakes.fcm["ca_path"],
        "PUSH_VAPID_PRIVATE_KEY": str(work / "vapid-private-key"),
        "PUSH_VAPID_SUBJECT": "mailto:bench@example.org",
        "PUSH_WEBPUSH_CA_FILE": fakes.webpush["ca_file"],
        "PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS": fakes.webpush["origin"].removeprefix("https://"),
        "PUSH_LOG_LEVEL": "info",
    })
    return env


# -- database ----------------------------------------------------------------------------------------

class _SqliteCursor:
    """A sqlite3 cursor taking the MariaDB statements of this file: ``%s`` placeholders, tables
    named with the database (``push_bench.x``), TRUNCATE, ANALYZE TABLE."""

    def __init__(self, cursor) -> None:
        self.cursor = cursor

    @staticmethod
    def _sql(statement: str) -> str:
        statement = statement.replace(f"{DB_NAME}.", "").replace("%s", "?").replace("%%", "%")
        statement = re.sub(r"^TRUNCATE TABLE", "DELETE FROM", statement)
        return re.sub(r"^ANALYZE TABLE .*", "ANALYZE", statement)

    def execute(self, statement: str, parameters: tuple = ()) -> None:
        if not statement.startswith("USE "):
            self.cursor.execute(self._sql(statement), parameters)

    def executemany(self, statement: str, rows: list[tuple]) -> None:
        self.cursor.executemany(self._sql(statement), rows)

    @property
    def rowcount(self) -> int:
        return self.cursor.rowcount

    def fetchone(self):
        return self.cursor.fetchone()

    def fetchall(self):
        return self.cursor.fetchall()

    def __enter__(self) -> _SqliteCursor:
        return self

    def __exit__(self, *_exc) -> None:
        self.cursor.close()


class _SqliteConnection:
    """The bench's own connection to the functions' SQLite file, used as PyMySQL's is."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        self.connection = sqlite3.connect(path, isolation_level=None, timeout=30)

    def cursor(self) -> _SqliteCursor:
        return _SqliteCursor(self.connection.cursor())

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> _SqliteConnection:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def db_connect():
    """A connection to the benchmark's database: MariaDB's server (``DB_NAME`` on it), or with
    ``--database sqlite`` the functions' SQLite file."""
    if SQLITE_PATH is not None:
        return _SqliteConnection(SQLITE_PATH)
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(DB_SERVER)
    return pymysql.connect(host=url.host, port=url.port or 3306, user=url.username,
                           password=url.password or "", autocommit=True)


def database_pids() -> list[int]:
    """The MariaDB server's processes (read by name in /proc), whose CPU over a window is the
    database work of the function's statements, and of anything else that uses that server
    meanwhile (other databases on it): an upper bound. None with SQLite: its work is done in
    the function's own process."""
    if SQLITE_PATH is not None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def prepare_database(env: dict[str, str]) -> None:
    if SQLITE_PATH is None:
        with db_connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {DB_NAME}")
    subprocess.run([str(BIN / "pushctl"), "migrate"], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def clear_tables(*tables: str) -> None:
    with db_connect() as conn, conn.cursor() as cur:
        cur.execute(f"USE {DB_NAME}")
        for table in tables:
            cur.execute(f"TRUNCATE TABLE {table}")


def delivery_states() -> dict[str, int]:
    """Outcomes the dispatcher recorded (deliveries table): proof the pushes were accepted by
    the fake, since the dispatcher answers 202 for rejected pushes too."""
    with db_connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT state, reason, COUNT(*) FROM {DB_NAME}.deliveries GROUP BY state, reason")
        return {f"{state}{':' + reason if reason else ''}": n for state, reason, n in cur.fetchall()}


def count_subscriptions() -> int:
    with db_connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {DB_NAME}.subscriptions")
        return cur.fetchone()[0]


INSERT = (f"INSERT INTO {DB_NAME}.subscriptions (user_id, provider, token, token_sha256, topic, "
          "environment, app, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, NULL, %s, %s)")


def _insert(rows: list[tuple], batch: int = 5000) -> None:
    with db_connect() as conn, conn.cursor() as cur:
        for start in range(0, len(rows), batch):
            cur.executemany(INSERT, rows[start:start + batch])


def seed_hot(fakes: Fakes) -> list[str]:
    """HOT_USERS users with 3 devices of each provider, and SOLO_USERS with one of each; the hot
    users' ids (the users files for the loadgen are written by :func:`write_users`)."""
    # provider_tokens: a token of an earlier run was signed by that run's fake key.
    clear_tables("subscriptions", "deliveries", "rate_counters", "pending_pushes", "provider_tokens")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows, users = [], []
    webpush = iter(fakes.webpush_subscriptions)
    for i in range(HOT_USERS):
        user = f"hot{i}"
        users.append(user)
        for _ in range(DEVICES_PER_USER):
            apns = secrets.token_hex(32)
            rows.append((user, "apns", apns, hashlib.sha256(apns.encode()).hexdigest(), TOPIC,
                         "production", now, now))
            fcm = secrets.token_urlsafe(120)
            rows.append((user, "fcm", fcm, hashlib.sha256(fcm.encode()).hexdigest(), None, None, now, now))
            sub = next(webpush)
            rows.append((user, "webpush", json.dumps(sub), hashlib.sha256(sub["endpoint"].encode()).hexdigest(),
                         None, None, now, now))
    for i in range(SOLO_USERS):
        user = f"solo{i}"
        apns = secrets.token_hex(32)
        rows.append((user, "apns", apns, hashlib.sha256(apns.encode()).hexdigest(), TOPIC, "production", now, now))
        fcm = secrets.token_urlsafe(120)
        rows.append((user, "fcm", fcm, hashlib.sha256(fcm.encode()).hexdigest(), None, None, now, now))
        sub = next(webpush)
        rows.append((user, "webpush", json.dumps(sub), hashlib.sha256(sub["endpoint"].encode()).hexdigest(),
                     None, None, now, now))
    _insert(rows)
    return users


def write_users(work: Path) -> None:
    """The loadgen's users files: users with 3 devices of each provider, and with 1."""
    (work / "users-3.txt").write_text("".join(f"hot{i}\n" for i in range(HOT_USERS)))
    (work / "users-1.txt").write_text("".join(f"solo{i}\n" for i in range(SOLO_USERS)))


def fill_to(total: int) -> float:
    """Add filler subscriptions (users the load never names) until the table holds ``total``;
    the seconds it took.

    The rows go in in the order of both secondary indexes (token hash, then user): random
    inserts into a million-row unique index outgrow InnoDB's default 128 MB buffer pool and
    took ~9 minutes here, in order they take a fraction of that. The indexes end up the same,
    only more tightly packed."""
    have = count_subscriptions()
    missing = total - have
    if missing <= 0:
        return 0.0
    log(f"bulk-inserting {missing} filler subscriptions (to {total})")
    started = time.monotonic()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    tokens = []
    for j in range(missing):
        provider = PROVIDERS[j % 3]
        if provider == "webpush":
            identity = f"https://push.example.org/push/f{have + j}"
            token = json.dumps({"endpoint": identity, "keys": {"p256dh": "x", "auth": "y"}})
        else:
            identity = token = secrets.token_hex(32)
        tokens.append((hashlib.sha256(identity.encode()).hexdigest(), provider, token))
    tokens.sort()
    batch = 10000
    with db_connect() as conn, conn.cursor() as cur:
        for first in range(0, missing, batch):
            rows = [(f"fill{(have + k) // 9:08d}", provider, token, digest,
                     TOPIC if provider == "apns" else None,
                     "production" if provider == "apns" else None, now, now)
                    for k, (digest, provider, token) in enumerate(tokens[first:first + batch], first)]
            cur.executemany(INSERT, rows)
        cur.execute(f"ANALYZE TABLE {DB_NAME}.subscriptions")
        cur.fetchall()
    return time.monotonic() - started


# -- functions ---------------------------------------------------------------------------------------

class Function:
    """One function as deployed: the Dockerfile's command (gunicorn with one uvicorn worker
    serving functions-framework's ASGI app)."""

    def __init__(self, procs: Procs, env: dict[str, str], name: str) -> None:
        self.procs, self.name = procs, name
        self.port = free_port()
        self.env = dict(env, PUSH_METRICS_PORT=str(free_port()))
        self.proc: subprocess.Popen | None = None
        self.start_cpu = 0.0

    def start(self, first: tuple[str, dict[str, str], bytes, tuple[int, ...]] | None = None) -> float:
        """Start it; seconds from the spawn to the first 2xx on /readyz, or with ``first`` (path,
        headers, body, accepted statuses: :func:`first_request`) to the first answer to that
        POST with one of those statuses (and in ``start_cpu``, the CPU seconds its processes used
        until then)."""
        # The Dockerfile's command itself, run by a shell as the image runs it, with the function's
        # folder found in this checkout: the figures are of what deploys.
        # With --source, the functions and the shared package of another checkout (an A/B
        # comparison of two commits in one session), still started by this checkout's command.
        command = (COMMAND or deployed_command()).replace("/app/functions/", f"{SOURCE}/functions/")
        env = dict(self.env, FUNCTION=self.name, PORT=str(self.port),
                   PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}")
        if SOURCE != REPO:
            env["PYTHONPATH"] = str(SOURCE)
        args = ["sh", "-c", command]
        started = time.perf_counter()
        self.proc = self.procs.spawn(args, self.name, env=env, cwd=SOURCE, stdout=subprocess.DEVNULL)
        import http.client

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.procs.work / (self.name + '.stderr')}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if first is None:
                    c.request("GET", "/readyz")
                else:
                    c.request("POST", first[0], body=first[2], headers=first[1])
                status = c.getresponse().status
                c.close()
                if (200 <= status < 300) if first is None else status in first[3]:
                    elapsed = time.perf_counter() - started
                    self.start_cpu = cpu_seconds(self.pids)
                    return elapsed
            except OSError:
                pass
            if time.perf_counter() - started > 60:
                raise RuntimeError(f"{self.name} not ready after 60 s")
            time.sleep(0.005)

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None
        return tree(self.proc.pid)

    @property
    def worker_pid(self) -> int:
        pids = self.pids
        return pids[-1]

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


def run_load(fn: Function, work: Path, *, mode: str = "closed", kind: str = "event",
             concurrency: int = 16, rate: float = 200, duration: float = 10, warmup: float = 2,
             users_per_event: int = 1, devices: int = DEVICES_PER_USER,
             sample_pids: list[int] | None = None,
             counts: Callable[[], dict] | None = None) -> dict:
    """Run bench/loadgen.py against ``fn``, events for users with ``devices`` devices each;
    its result plus, over the measured window, the CPU seconds of the function's whole process
    tree, of the load generator, of ``sample_pids`` (the fake) and of the database server (MariaDB;
    with SQLite the database work is in the function's process), the peak worker RSS, and with
    ``counts`` (a fake's), what the fake answered in the window (``fake_counts``)."""
    args = [PYTHON, str(REPO / "bench" / "loadgen.py"), "--port", str(fn.port), "--mode", mode,
            "--kind", kind, "--concurrency", str(concurrency), "--rate", str(rate),
            "--duration", str(duration), "--warmup", str(warmup),
            "--users-per-event", str(users_per_event),
            "--users-file", str(work / f"users-{devices}.txt"), "--tokens-file", str(work / "jwts.txt")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    pids = fn.pids
    extra = sample_pids or []
    database = database_pids()
    peak = {"rss": 0.0}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            m = memory_mb(fn.worker_pid)
            peak["rss"] = max(peak["rss"], m.get("rss", 0))

    def snapshot() -> tuple[float, ...]:
        """The function's user and system CPU seconds, the others' (fake), the load generator's
        and the database server's CPU seconds, the time."""
        return (*cpu_times(pids), cpu_seconds(extra), cpu_seconds([proc.pid]), cpu_seconds(database),
                time.monotonic())

    sampler = threading.Thread(target=sample, daemon=True)
    profiler = None
    result: dict = {}
    cpu: dict[str, tuple[float, ...]] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        message = json.loads(line)
        if message["phase"] == "start":
            if counts is not None:
                fake_before = counts()
            cpu["start"] = snapshot()
            sampler.start()
            if PROFILE_DIR is not None:
                PROFILE_DIR.mkdir(parents=True, exist_ok=True)
                label = f"{fn.name}-{kind}-{mode}-u{users_per_event}-c{concurrency}-{int(time.time())}"
                profiler = subprocess.Popen(
                    [str(BIN / "py-spy"), "record", "--pid", str(fn.worker_pid), "--format", "raw", "--gil",
                     "--rate", "200", "--duration", str(int(duration)), "--nonblocking",
                     "--output", str(PROFILE_DIR / f"{label}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif message["phase"] == "end":
            cpu["end"] = snapshot()
            if counts is not None:
                fake_after = counts()
                result_counts = {key: fake_after[key] - fake_before[key] for key in
                                 ("pushes_accepted", "pushes_refused", "streams_refused",
                                  "goaways", "connections_made")}
            stop_sampling.set()
        else:
            result = message
    proc.wait()
    stop_sampling.set()
    if profiler is not None:
        profiler.wait()
    (user, system, other, loadgen, db, wall) = (
        round(end - start, 3) for start, end in zip(cpu["start"], cpu["end"]))
    result["function_cpu_seconds"] = round(user + system, 3)
    result["function_system_cpu_seconds"] = system
    result["other_cpu_seconds"] = other
    result["loadgen_cpu_seconds"] = loadgen
    result["database_cpu_seconds"] = db if database else None
    result["wall_seconds"] = wall
    result["peak_rss_mb"] = round(peak["rss"], 1)
    if counts is not None:
        result["fake_counts"] = result_counts
    return result


# -- sections ----------------------------------------------------------------------------------------

H2LOAD_RPS = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")


def h2load(args: list[str]) -> tuple[float | None, str]:
    out = subprocess.run(["h2load", *args], capture_output=True, text=True, timeout=300).stdout
    match = H2LOAD_RPS.search(out)
    status = re.search(r"status codes: (.*)", out)
    return (float(match.group(1)) if match else None), (status.group(1).strip() if status else out[-300:])


def section_fakes(work: Path, fakes: Fakes, quick: bool) -> None:
    """The fakes' ceilings, measured with h2load (C, so the client is not the limit)."""
    if shutil.which("h2load") is None:
        log("h2load not found (apt-get install nghttp2-client): fake ceilings skipped")
        return
    import jwt

    duration = "5" if quick else "10"
    # APNs: a provider token signed as aioapns does, a valid device path and body.
    token = jwt.encode({"iss": fakes.apns["team_id"], "iat": int(time.time())},
                       Path(fakes.apns["key_path"]).read_text(), algorithm="ES256",
                       headers={"kid": fakes.apns["key_id"]})
    body = work / "apns-body.json"
    body.write_text(json.dumps({"aps": {"alert": "checkEchoV1", "mutable-content": 1,
                                        "thread-id": "checkEchoV1"}, "data": {"type": "checkEchoV1"}}))
    for connections, streams in ((4, 100), (1, 100)):
        rps, statuses = h2load([
            "-D", duration, "--warm-up-time", "1", "-c", str(connections), "-m", str(streams), "-t", "1",
            "-d", str(body), "-H", f"authorization: bearer {token}", "-H", f"apns-topic: {TOPIC}",
            "-H", "apns-push-type: alert", "-H", "apns-priority: 10", "-H", "apns-expiration: 0",
            "-H", "content-type: application/json",
            f"{fakes.apns['base_url']}/3/device/{secrets.token_hex(32)}"])
        emit("fake_ceiling", rps, "requests/s", "apns", tool="h2load", connections=connections,
             streams_per_connection=streams, seconds=int(duration), statuses=statuses)
    # FCM: an access token from the fake's own token endpoint, then messages:send.
    access = fcm_access_token(fakes)
    from shared.core import Device, WakeUp
    from shared.providers.fcm import _message

    body = work / "fcm-body.json"
    body.write_bytes(_message(Device(1, secrets.token_urlsafe(120)), WakeUp("checkEchoV1", 86400)))
    for connections, streams in ((8, 100), (1, 100)):
        rps, statuses = h2load([
            "-D", duration, "--warm-up-time", "1", "-c", str(connections), "-m", str(streams), "-t", "1",
            "-d", str(body), "-H", f"authorization: Bearer {access}", "-H", "content-type: application/json",
            f"{fakes.fcm['endpoint']}/v1/projects/{fakes.fcm['project_id']}/messages:send"])
        emit("fake_ceiling", rps, "requests/s", "fcm", tool="h2load", connections=connections,
             streams_per_connection=streams, seconds=int(duration), statuses=statuses)
    # Web Push (HTTP/1.1): one subscription, a body encrypted for it and a VAPID header, reused.
    from shared.providers.webpush import WebPushProvider, _encrypt, _parse_subscription

    subscription = fakes.webpush_subscriptions[0]
    provider = WebPushProvider(vapid_private_key=(work / "vapid-private-key").read_text(),
                               vapid_subject="mailto:bench@example.org")
    body = work / "webpush-body.bin"
    body.write_bytes(_encrypt(b'{"type":"checkEchoV1"}', _parse_subscription(json.dumps(subscription))))
    vapid = provider._vapid_header(fakes.webpush["origin"])
    for connections in (16,):
        rps, statuses = h2load([
            "--h1", "-D", duration, "--warm-up-time", "1", "-c", str(connections), "-t", "1",
            "-d", str(body), "-H", f"authorization: {vapid}", "-H", "ttl: 86400", "-H", "urgency: normal",
            "-H", "topic: checkEchoV1", "-H", "content-encoding: aes128gcm",
            subscription["endpoint"]])
        emit("fake_ceiling", rps, "requests/s", "webpush", tool="h2load --h1", connections=connections,
             seconds=int(duration), statuses=statuses)


def section_clients(env: dict, work: Path, fakes: Fakes, providers: list[str], quick: bool) -> None:
    """Each provider module alone against its fake (bench/clients.py): the CPU a send costs
    with no server, database or dispatcher around it."""
    subscriptions = work / "webpush-subscriptions.txt"
    subscriptions.write_text("\n".join(json.dumps(s) for s in fakes.webpush_subscriptions) + "\n")
    for provider in providers:
        args = [PYTHON, str(REPO / "bench" / "clients.py"), provider, "--sends", "3000" if quick else "9000",
                "--concurrency", "100", "--subscriptions", str(subscriptions)]
        if PROFILE_DIR is not None:
            PROFILE_DIR.mkdir(parents=True, exist_ok=True)
            args = [str(BIN / "py-spy"), "record", "--format", "raw", "--gil", "--rate", "250", "--nonblocking",
                    "--output", str(PROFILE_DIR / f"client-{provider}.txt"), "--"] + args
        out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            log(f"clients {provider} failed: {out.stderr[-500:]}")
            continue
        # The last JSON line: py-spy, when profiling, prints its own lines after it.
        r = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
        emit("client_cpu_per_send", r["cpu_us_per_send"], "us CPU/send", provider, concurrency=100,
             sends=r["sends"], sends_per_second=r["sends_per_second"], outcomes=r["outcomes"],
             measured="the provider module alone against its fake, in one process (bench/clients.py)")


def fcm_access_token(fakes: Fakes) -> str:
    import httpx
    import jwt

    info = json.loads(Path(fakes.fcm["credentials_path"]).read_text())
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": info["client_email"], "aud": info["token_uri"], "iat": now, "exp": now + 3600,
         "scope": "https://www.googleapis.com/auth/firebase.messaging"},
        info["private_key"], algorithm="RS256", headers={"kid": info["private_key_id"]})
    response = httpx.post(info["token_uri"], verify=fakes.fcm["ca_path"], data={
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
    response.raise_for_status()
    return response.json()["access_token"]


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": round(ordered[0], 4), "median": round(ordered[len(ordered) // 2], 4),
            "max": round(ordered[-1], 4)}


def per(numerator: float | None, denominator: float, scale: float = 1000) -> float | None:
    """``numerator`` / ``denominator`` x ``scale`` (seconds to ms), None when there is none."""
    return round(numerator / denominator * scale, 4) if numerator is not None and denominator else None


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``--shapes``: users x devices per event (``1x1,1x3,100x3``); a bare number is that many
    users of 3 devices."""
    shapes = []
    for item in text.split(","):
        users, _, devices = item.partition("x")
        shapes.append((int(users), int(devices or DEVICES_PER_USER)))
    return tuple(shapes)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def dispatch_figures(fn: Function, provider: str, work: Path, fakes: Fakes, quick: bool,
                     stored: int, suffix: str = "",
                     shapes: tuple[tuple[int, int], ...] = ((1, 3), (100, 3))) -> dict[str, float]:
    """Sustained pushes/s and CPU per push and per event for each shape (users x devices per
    event), each over RUNS runs, the pushes counted at the fake (accepted in the measured
    window). Returns the median pushes/s by shape ("1x3")."""
    duration = 8 if quick else 20
    out = {}
    for users, devices in shapes:
        shape = f"{users}x{devices}"
        concurrency = CONCURRENCY[1 if users == 1 else 100]
        runs = []
        for _ in range(RUNS):
            clear_tables("deliveries")
            load_before = loadavg()
            r = run_load(fn, work, concurrency=concurrency, duration=duration, warmup=2,
                         users_per_event=users, devices=devices, sample_pids=[fakes.pid(provider)],
                         counts=lambda: fakes.counts(provider))
            counted = r["fake_counts"]
            pushes, events = counted["pushes_accepted"], r["ok"]
            database = r["database_cpu_seconds"]
            runs.append({
                "pushes_per_second": pushes / r["wall_seconds"],
                "cpu_ms_per_push": per(r["function_cpu_seconds"], pushes),
                "cpu_ms_per_event": per(r["function_cpu_seconds"], events),
                "database_cpu_ms_per_event": per(database, events),
                "loadgen_cpu_ms_per_event": per(r["loadgen_cpu_seconds"], events),
                "fake_cpu_ms_per_push": per(r["other_cpu_seconds"], pushes),
                "pushes": pushes, "events": events, "non_2xx": counted["pushes_refused"],
                "streams_refused": counted["streams_refused"], "goaways": counted["goaways"],
                "connections_made": counted["connections_made"],
                "events_per_second": round(events / r["wall_seconds"], 1),
                "event_statuses": r["statuses"], "event_latency_ms": r["latency_ms"],
                "function_cpu_seconds": r["function_cpu_seconds"],
                "of_which_system": r["function_system_cpu_seconds"],
                "fake_cpu_seconds": r["other_cpu_seconds"], "loadgen_cpu_seconds": r["loadgen_cpu_seconds"],
                "database_cpu_seconds": database, "peak_rss_mb": r["peak_rss_mb"],
                "loadavg_1m": [load_before, loadavg()],
                "recorded_outcomes": delivery_states(),
            })
        rates = [run["pushes_per_second"] for run in runs]
        out[shape] = spread(rates)["median"]
        common = dict(shape=shape, users_per_event=users, devices_per_user=devices,
                      concurrency=concurrency, seconds=duration, runs=len(runs),
                      subscriptions_stored=stored, network=NETWORK,
                      loadavg_1m=spread([x for run in runs for x in run["loadavg_1m"]]),
                      counted="pushes the fake accepted in the measured window")
        emit(f"dispatch_pushes_per_second{suffix}", round(spread(rates)["median"], 1), "pushes/s",
             provider, spread=spread(rates), non_2xx=sum(run["non_2xx"] for run in runs),
             per_run=runs, **common)
        for key, name, unit, measured in (
            ("cpu_ms_per_push", "dispatch_cpu_per_push", "ms CPU/push",
             "user + system CPU of the function's whole process tree (gunicorn master and worker, "
             "all threads; with SQLite the database work too) / pushes counted at the fake"),
            ("cpu_ms_per_event", "dispatch_cpu_per_event", "ms CPU/event",
             "the same CPU / events answered 2xx in the window"),
            ("database_cpu_ms_per_event", "database_cpu_per_event", "ms CPU/event",
             "the MariaDB server's CPU over the window / events (an upper bound: the server is shared)"),
            ("loadgen_cpu_ms_per_event", "loadgen_cpu_per_event", "ms CPU/event",
             "the load generator's process (not part of the function's figures)"),
        ):
            values = [run[key] for run in runs if run[key] is not None]
            if values:
                emit(f"{name}{suffix}", spread(values)["median"], unit, provider, spread=spread(values),
                     measured=measured, **common)
        if not suffix:
            emit("rss_under_load", max(run["peak_rss_mb"] for run in runs), "MB", provider,
                 shape=shape, process="uvicorn worker (peak VmRSS)")
    return out


def section_dispatch(procs: Procs, env: dict, work: Path, fakes: Fakes, quick: bool, only: set[str],
                     providers: list[str], stored: int) -> dict:
    results = {}
    for provider in providers:
        fn = Function(procs, env, f"dispatch-{provider}")
        log(f"dispatch-{provider}: starting")
        fn.start()
        # One event so connections, tokens and the VAPID header exist before measuring.
        run_load(fn, work, concurrency=1, duration=1, warmup=0.5, users_per_event=1)
        if "dispatch" in only:
            log(f"dispatch-{provider}: throughput, {RUNS} runs per shape")
            results[provider] = dispatch_figures(fn, provider, work, fakes, quick, stored,
                                                 shapes=SHAPES)
        if "latency" in only:
            log(f"dispatch-{provider}: latency at {LATENCY_RATE} events/s, {RUNS} runs")
            runs = []
            for _ in range(RUNS):
                clear_tables("deliveries")
                load_before = loadavg()
                r = run_load(fn, work, mode="open", rate=LATENCY_RATE, duration=8 if quick else 20, warmup=2,
                             users_per_event=1, devices=3)
                runs.append(dict(r["latency_ms"], events=r["ok"], statuses=r["statuses"],
                                 function_cpu_seconds=r["function_cpu_seconds"],
                                 loadavg_1m=[load_before, loadavg()]))
            params = dict(offered_events_per_second=LATENCY_RATE, shape="1x3", users_per_event=1,
                          devices_per_user=3, network=NETWORK, runs=len(runs), per_run=runs,
                          loadavg_1m=spread([x for run in runs for x in run["loadavg_1m"]]),
                          measured="open loop, from each event's scheduled start to the dispatcher's 2xx "
                                   "(sent after the fake answered every push: an upper bound of "
                                   "event-to-provider)")
            for p in ("p50", "p99"):
                values = [run[p] for run in runs if p in run]
                emit(f"event_latency_{p}", spread(values)["median"], "ms", provider, spread=spread(values),
                     **params)
        fn.stop()
    return results


def first_request(name: str, work: Path) -> tuple[str, dict[str, str], bytes, tuple[int, ...]]:
    """What a function's cold start is measured to: its first real request (path, headers,
    body, the statuses that answer it). A dispatcher: an event for a user with one device (a
    push sent); subscribe: a new FCM token; unsubscribe: a logout (200, or 404 without
    subscriptions); clean-up: a dead-token report."""
    ce = {"ce-specversion": "1.0", "ce-source": "/bench/coldstart", "ce-id": secrets.token_hex(8),
          "Content-Type": "application/json"}
    bearer = {"Authorization": "Bearer " + (work / "jwts.txt").read_text().split("\n", 1)[0],
              "Content-Type": "application/json"}
    if name.startswith("dispatch-"):
        return "/", dict(ce, **{"ce-type": "org.wikimedia.push.notification.requested.v1"}), json.dumps(
            {"users": ["solo0"], "message_type": "checkEchoV1"}).encode(), (200, 201, 202)
    if name == "subscribe":
        return "/", bearer, json.dumps({"provider": "fcm", "token": "cold-" + secrets.token_urlsafe(40)}).encode(), (
            200, 201)
    if name == "unsubscribe":
        return "/", bearer, b'{"all": true}', (200, 404)
    report = {"provider": "fcm", "subscriptions": [
        {"id": 1, "token_sha256": "0" * 64, "reason": "UNREGISTERED",
         "observed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}]}
    return "/", dict(ce, **{"ce-type": "org.wikimedia.push.subscription.invalid.v1"}), json.dumps(
        report).encode(), (200, 201, 202, 204)


def tree_memory(pids: list[int]) -> dict[str, float]:
    """PSS and RSS summed over ``pids`` (PSS counts a page shared by the master and its worker
    once in all, so the sum is the function's memory)."""
    totals = {"pss": 0.0, "rss": 0.0}
    for pid in pids:
        for key, value in memory_mb(pid).items():
            totals[key] += value
    return {key: round(value, 1) for key, value in totals.items()}


def section_coldstart(procs: Procs, env: dict, work: Path, quick: bool) -> None:
    """Each function started by the image's command, RUNS times (2 with --quick): the time and
    CPU from the spawn to its first real request answered, then, a second later, its memory
    (PSS of all its processes)."""
    runs = 2 if quick else RUNS
    for name in FUNCTIONS:
        times, cpus, pss, rss, loads = [], [], [], [], []
        for _ in range(runs):
            fn = Function(procs, env, name)
            loads.append(loadavg())
            times.append(fn.start(first_request(name, work)) * 1000)
            cpus.append(fn.start_cpu * 1000)
            time.sleep(1.0)
            memory = tree_memory(fn.pids)
            pss.append(memory["pss"])
            rss.append(memory["rss"])
            fn.stop()
        provider = name.replace("dispatch-", "") if name.startswith("dispatch-") else None
        common = dict(function=name, runs=runs, loadavg_1m=spread(loads))
        emit("cold_start", round(spread(times)["median"], 1), "ms", provider, spread=spread(times),
             cpu_ms=spread(cpus), measured="spawn of the image's command line -> the answer to the first "
             "real request (an event, a subscribe, ...; first_request()); cpu_ms: user + system CPU of "
             "all its processes until then", **common)
        emit("idle_memory_pss", spread(pss)["median"], "MB", provider, spread=spread(pss), rss_mb=spread(rss),
             measured="PSS (smaps_rollup) summed over all the function's processes, 1 s after its "
             "first answer", **common)


def section_subscribe(procs: Procs, env: dict, work: Path, quick: bool) -> None:
    fn = Function(procs, env, "subscribe")
    fn.start()
    concurrency = 16
    runs = []
    for _ in range(RUNS):
        load_before = loadavg()
        r = run_load(fn, work, kind="subscribe", concurrency=concurrency, duration=8 if quick else 20, warmup=2)
        runs.append({"requests_per_second": round(r["ok"] / r["wall_seconds"], 1), "statuses": r["statuses"],
                     "latency_ms": r["latency_ms"],
                     "cpu_ms_per_request": per(r["function_cpu_seconds"], r["ok"]),
                     "database_cpu_ms_per_request": per(r["database_cpu_seconds"], r["ok"]),
                     "loadgen_cpu_ms_per_request": per(r["loadgen_cpu_seconds"], r["ok"]),
                     "loadavg_1m": [load_before, loadavg()]})
    rates = [run["requests_per_second"] for run in runs]
    p99s = [run["latency_ms"]["p99"] for run in runs]
    cpus = [run["cpu_ms_per_request"] for run in runs if run["cpu_ms_per_request"] is not None]
    common = dict(concurrency=concurrency, database=DATABASE_KIND, runs=len(runs), per_run=runs,
                  loadavg_1m=spread([x for run in runs for x in run["loadavg_1m"]]),
                  body="new FCM token, one of 2,000 users (201; over the cap of 10 the oldest is evicted)")
    emit("subscribe_requests_per_second", spread(rates)["median"], "requests/s", None, spread=spread(rates), **common)
    emit("subscribe_latency_p99", spread(p99s)["median"], "ms", None, spread=spread(p99s), **common)
    if cpus:
        emit("subscribe_cpu_per_request", spread(cpus)["median"], "ms CPU/request", None, spread=spread(cpus),
             **common)
    fn.stop()


def queue_pending(provider: str) -> int:
    """Every hot device of ``provider`` gets a pending wake-up, due now (the privacy delay's
    queue after a burst): how many."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with db_connect() as conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE TABLE {DB_NAME}.pending_pushes")
        cur.execute(
            f"INSERT INTO {DB_NAME}.pending_pushes (subscription_id, message_type, provider, ttl_seconds, "
            "created_at, due_at, version) SELECT id, 'checkEchoV1', provider, 3600, %s, %s, 1 "
            f"FROM {DB_NAME}.subscriptions WHERE provider = %s AND user_id LIKE 'hot%%'", (now, now, provider))
        return cur.rowcount


def count_pending() -> int:
    with db_connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {DB_NAME}.pending_pushes")
        return cur.fetchone()[0]


def post_tick(fn: Function) -> tuple[int, float]:
    """One privacy-delay tick, as the PingSource's event reaches a dispatcher: status, seconds."""
    import http.client

    headers = {"ce-specversion": "1.0", "ce-type": "dev.knative.sources.ping", "ce-source": "/bench/flush",
               "ce-id": secrets.token_hex(8), "ce-pushtick": "flush", "Content-Type": "application/json"}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", fn.port, timeout=120)
    connection.request("POST", "/", body=b'{"message": "flush"}', headers=headers)
    status = connection.getresponse().status
    connection.close()
    return status, time.perf_counter() - started


def section_flush(procs: Procs, env: dict, providers: list[str], quick: bool, dispatch_rates: dict) -> None:
    """How fast the privacy delay's queue drains: every hot device of a provider has a wake-up
    due, and ticks are posted one after another (as a PingSource would, minus the minute between
    them) until none is left. The flush goes round after round within one tick, so the queue
    should drain at about the rate the dispatcher sends large events (many devices at once)."""
    for provider in providers:
        fn = Function(procs, dict(env, PUSH_PRIVACY_DELAY="0-0"), f"dispatch-{provider}")
        fn.start()
        post_tick(fn)  # connections and tokens open before measuring
        runs = []
        for _ in range(2 if quick else 3):
            queued = queue_pending(provider)
            cpu_before, ticks, seconds = cpu_seconds(fn.pids), [], 0.0
            while count_pending() and len(ticks) < 20:
                status, took = post_tick(fn)
                ticks.append(status)
                seconds += took
            runs.append({"pushes_per_second": round(queued / seconds, 1), "queued": queued, "ticks": len(ticks),
                         "statuses": ticks, "left": count_pending(),
                         "cpu_ms_per_push": round((cpu_seconds(fn.pids) - cpu_before) / queued * 1000, 4)})
        rates = sorted(run["pushes_per_second"] for run in runs)
        median = rates[len(rates) // 2]
        # The dispatch section's figures of this run, when it ran: a flush round is like a large
        # event (many devices sent at once), so 100x3 is the rate to compare with.
        reference = {shape: round(rate, 1) for shape, rate in dispatch_rates.get(provider, {}).items()}
        emit("flush_pushes_per_second", median, "pushes/s", provider,
             measured="wake-ups due / seconds of the ticks that sent them; median of the runs",
             runs=runs, spread=[rates[0], rates[-1]], dispatch_pushes_per_second=reference or None,
             ratio_to_dispatch_100x3=round(median / reference["100x3"], 2) if "100x3" in reference else None)
        fn.stop()


def write_jwts(work: Path, users: int = 2000) -> None:
    import jwt

    key = (work / "auth-private.pem").read_text()
    now = int(time.time())
    with open(work / "jwts.txt", "w") as f:
        for i in range(users):
            f.write(jwt.encode({"sub": f"sub{i}", "iat": now, "exp": now + 7200}, key, algorithm="ES256") + "\n")


def main() -> int:
    global PROFILE_DIR, RUNS, SHAPES, LATENCY_RATE, DATABASE_KIND, DATABASE_URL, SQLITE_PATH, SOURCE, COMMAND
    parser = argparse.ArgumentParser(description="push-functions benchmarks (one JSON line per figure)")
    parser.add_argument("--quick", action="store_true", help="shorter runs; skips the 1M-subscription scale run")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="dispatchers to measure")
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="subscriptions for the scale run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for every function (an experiment; shown in the figures)")
    parser.add_argument("--concurrency", metavar="C1,C100", help="events in flight for 1-user and "
                        "100-user events (default 16,4)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the function during each measured window, and each provider client alone")
    parser.add_argument("--rtt-ms", type=float, default=NETWORK["rtt_ms"],
                        help="round trip the fakes add to every answer and handshake (default 50)")
    parser.add_argument("--recycle-after", type=int, default=NETWORK["recycle_after"],
                        help="streams after which the fakes recycle a connection (0: never)")
    parser.add_argument("--runs", type=int, default=3, help="runs per dispatch figure")
    parser.add_argument("--webpush-http1-only", action="store_true",
                        help="the fake push service speaks HTTP/1.1 only (no h2 in ALPN)")
    parser.add_argument("--shapes", default="1x1,1x3,100x3",
                        help="users x devices per event of the dispatch figures (a bare number: x3)")
    parser.add_argument("--latency-rate", type=float, default=LATENCY_RATE,
                        help="events/s of 1 x 3 for the latency figures (open loop; default 500)")
    parser.add_argument("--source", metavar="DIR", help="run the functions of another checkout (e.g. a "
                        "git worktree of the base commit), for A/B comparisons in one session")
    parser.add_argument("--command", help="start each function with this shell command instead of the "
                        "Dockerfile's CMD (same variables: $FUNCTION, $PORT; /app/functions/ is this checkout's)")
    parser.add_argument("--database", choices=("mariadb", "sqlite"), default="mariadb",
                        help="the functions' database (sqlite: a file in the work directory)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if args.quick and not args.only:
        only.discard("scale")
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    providers = [p for p in args.providers.split(",") if p]
    RUNS = args.runs
    SHAPES = parse_shapes(args.shapes)
    LATENCY_RATE = args.latency_rate
    DATABASE_KIND = args.database
    SOURCE = Path(args.source).resolve() if args.source else REPO
    COMMAND = args.command
    NETWORK.update(rtt_ms=args.rtt_ms, recycle_after=args.recycle_after)
    if args.webpush_http1_only:
        NETWORK["webpush_http1_only"] = True
    if args.concurrency:
        CONCURRENCY[1], CONCURRENCY[100] = (int(c) for c in args.concurrency.split(","))
    PROFILE_DIR = Path(args.profile).resolve() if args.profile else None

    # Two runs at once would truncate each other's tables and share the CPU: one at a time.
    lock = db_connect()
    with lock.cursor() as cur:
        cur.execute(f"SELECT GET_LOCK('{DB_NAME}', 0)")
        if cur.fetchone()[0] != 1:
            log(f"another benchmark run holds the {DB_NAME} lock: wait for it to finish")
            return 2
    work = Path(tempfile.mkdtemp(prefix="push-bench-"))
    if args.database == "sqlite":
        SQLITE_PATH = work / "push.sqlite3"
        DATABASE_URL = f"sqlite:///{SQLITE_PATH}"
    procs = Procs(work)
    try:
        fakes = Fakes(procs, work)
        fakes.start()
        env = make_environment(work, fakes)
        for item in args.env:
            name, _, value = item.partition("=")
            env[name] = value
            EXTRA_ENV[name] = value
        log(f"work directory {work}; database {DATABASE_URL}")
        prepare_database(env)
        seed_hot(fakes)
        write_users(work)
        write_jwts(work)
        fill_to(10_000)
        if "fakes" in only:
            section_fakes(work, fakes, args.quick)
        if "clients" in only:
            log("provider clients alone")
            section_clients(env, work, fakes, providers, args.quick)
        base = {}
        if only & {"dispatch", "latency"}:
            base = section_dispatch(procs, env, work, fakes, args.quick, only, providers, 10_000)
        if "flush" in only:
            log("privacy-delay flush")
            section_flush(procs, env, providers, args.quick, base)
        if "coldstart" in only:
            log("cold starts")
            section_coldstart(procs, env, work, args.quick)
        if "subscribe" in only:
            log("subscribe")
            section_subscribe(procs, env, work, args.quick)
            # Subscribe added rows: back to the dispatch data set.
            seed_hot(fakes)
            fill_to(10_000)
        if "scale" in only:
            for provider in [p for p in providers if p == "apns"] or providers[:1]:
                fn = Function(procs, env, f"dispatch-{provider}")
                fn.start()
                run_load(fn, work, concurrency=1, duration=1, warmup=0.5)
                small = base.get(provider) or dispatch_figures(fn, provider, work, fakes, args.quick, 10_000,
                                                             suffix="_at_10k")
                fn.stop()
                seconds = fill_to(args.scale_rows)
                emit("bulk_insert_seconds", round(seconds, 1), "s", None, rows=args.scale_rows - 10_000,
                     method="pymysql executemany, batches of 10,000")
                fn = Function(procs, env, f"dispatch-{provider}")
                fn.start()
                run_load(fn, work, concurrency=1, duration=1, warmup=0.5)
                big = dispatch_figures(fn, provider, work, fakes, args.quick, args.scale_rows,
                                       suffix="_at_1m" if args.scale_rows == 1_000_000 else f"_at_{args.scale_rows}")
                fn.stop()
                for shape in big:
                    emit("scale_ratio", round(big[shape] / small[shape], 3), "ratio (large/10k pushes/s)",
                         provider, shape=shape, rows_large=args.scale_rows, rows_small=10_000)
            seed_hot(fakes)
            fill_to(10_000)
    finally:
        procs.stop_all()
        lock.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
