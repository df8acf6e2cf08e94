"""Local servers that speak each push provider's wire protocol, for tests, benchmarks and the
local stack. Each runs in a background thread of the test process, or standalone
(``python -m tests.fakes.apns --help``)."""
from __future__ import annotations

import json
import signal
import threading


def announce_and_wait(info: dict[str, object]) -> None:
    """For a standalone fake: print what a client needs to reach it as one JSON line, then
    serve until SIGINT or SIGTERM."""
    print(json.dumps(info), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
