"""The benchmark's load generator: runs in its own process, posts to one function over HTTP/1.1
keep-alive connections, and prints JSON lines on stdout.

It uses a minimal asyncio HTTP/1.1 client (a few lines below) rather than aiohttp or httpx, so
that the load generator spends as little of the machine's two cores as possible per request.

Modes:

``closed``     ``--concurrency`` workers, each posting the next request as soon as the last one
               was answered: the function's sustained throughput.
``open``       requests started at a fixed ``--rate`` whatever the answers (new connections are
               opened when all are busy), latency measured from each request's *scheduled* start
               so a stalled server cannot hide its queueing (no coordinated omission).

Requests are either binary-mode CloudEvents (``--kind event``: ``notification.requested.v1`` for
``--users-per-event`` users drawn from ``--users-file``, a fresh ``ce-id`` each, so no event is
a redelivery) or subscribe requests (``--kind subscribe``: a bearer JWT from ``--tokens-file``
and a new FCM token each).

Output: ``{"phase": "start"}`` when the measured window opens (after ``--warmup`` seconds),
``{"phase": "end"}`` when it closes, and finally ``{"phase": "result", ...}`` with counts by
status and latency percentiles (milliseconds) of the requests *started* in the window. The
orchestrator reads the process CPU time of the function at the start/end lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import uuid
from collections import Counter

NOTIFICATION_REQUESTED = "org.wikimedia.push.notification.requested.v1"


STALE = -1
"""The connection closed before a byte of the answer came."""


class Connection:
    """One HTTP/1.1 keep-alive connection; requests in sequence."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, headers: bytes, body: bytes) -> int:
        """The answer's status; 599 when the connection broke. A kept-alive connection the
        server closed while it sat idle (uvicorn closes them after 5 s) is reopened and the
        request sent again, as HTTP clients do: that is not the server failing a request."""
        reused = self.writer is not None
        status = await self._request(path, headers, body)
        if status == STALE and reused:
            status = await self._request(path, headers, body)
        return 599 if status == STALE else status

    async def _request(self, path: str, headers: bytes, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), self.host.encode(), self.port, len(body), headers, body)
        )
        try:
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                self.close()
                return STALE  # closed before a byte of the answer
            status = int(head[9:12])
            length, chunked, close = 0, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            return 599
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Requests:
    """Makes the next request's (path, headers, body)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kind = args.kind
        self.users_per_event = args.users_per_event
        self.users: list[str] = []
        self.tokens: list[str] = []
        if args.users_file:
            with open(args.users_file) as f:
                self.users = [line.strip() for line in f if line.strip()]
        if args.tokens_file:
            with open(args.tokens_file) as f:
                self.tokens = [line.strip() for line in f if line.strip()]
        self.source = f"/bench/{secrets.token_hex(4)}"

    def next(self) -> tuple[str, bytes, bytes]:
        if self.kind == "event":
            users = random.sample(self.users, self.users_per_event)
            body = json.dumps(
                {"users": users, "message_type": "checkEchoV1", "event_type": "edit-user-talk"}
            ).encode()
            headers = (
                b"Content-Type: application/json\r\nce-specversion: 1.0\r\n"
                b"ce-type: %s\r\nce-source: %s\r\nce-id: %s\r\n"
                % (NOTIFICATION_REQUESTED.encode(), self.source.encode(), uuid.uuid4().hex.encode())
            )
            return "/", headers, body
        token = random.choice(self.tokens)
        body = json.dumps({"provider": "fcm", "token": "bench-" + secrets.token_urlsafe(40)}).encode()
        headers = b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n" % token.encode()
        return "/", headers, body


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": round(values[-1] * 1000, 3)}


def say(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> dict:
    make = Requests(args)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    window_start = started + args.warmup
    window_end = window_start + args.duration
    announced = asyncio.Event()

    async def announce() -> None:
        await asyncio.sleep(max(0.0, window_start - loop.time()))
        say({"phase": "start"})
        announced.set()
        await asyncio.sleep(max(0.0, window_end - loop.time()))
        say({"phase": "end"})

    announcer = asyncio.create_task(announce())

    if args.mode == "closed":

        async def worker() -> None:
            connection = Connection(args.host, args.port)
            while True:
                begun = loop.time()
                if begun >= window_end:
                    break
                path, headers, body = make.next()
                status = await connection.request(path, headers, body)
                if begun >= window_start and loop.time() <= window_end:
                    statuses[status] += 1
                    latencies.append(loop.time() - begun)
            connection.close()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    else:
        idle: list[Connection] = []
        tasks: set[asyncio.Task] = set()
        opened = 0

        async def one(scheduled: float) -> None:
            nonlocal opened
            connection = idle.pop() if idle else None
            if connection is None:
                opened += 1
                connection = Connection(args.host, args.port)
            path, headers, body = make.next()
            status = await connection.request(path, headers, body)
            done = loop.time()
            idle.append(connection)
            if window_start <= scheduled < window_end:
                statuses[status] += 1
                latencies.append(done - scheduled)

        interval = 1.0 / args.rate
        i = 0
        while True:
            scheduled = started + i * interval
            if scheduled >= window_end:
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        for connection in idle:
            connection.close()
    await announcer
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return {
        "phase": "result",
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "window_seconds": args.duration,
        "requests_per_second": round(ok / args.duration, 2),
        "latency_ms": percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--kind", choices=("event", "subscribe"), default="event")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (open mode)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--users-file", help="user ids, one a line (events)")
    parser.add_argument("--users-per-event", type=int, default=1)
    parser.add_argument("--tokens-file", help="bearer JWTs, one a line (subscribe)")
    args = parser.parse_args()
    say(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
