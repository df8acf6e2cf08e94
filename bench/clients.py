"""The provider clients alone: CPU per request of each provider module (shared/providers/*)
against the standalone fakes, with no HTTP server, database or dispatcher around them. Run by bench/run.py in its own process (one provider per run), with the
functions' environment; prints one JSON line.

    python bench/clients.py PROVIDER --sends N --concurrency C [--subscriptions FILE]

It shows what a push costs at the least with each client library, the floor under a dispatcher's
CPU per push.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.core import Device, WakeUp  # noqa: E402

TOPIC = "org.wikimedia.wikipedia"


def devices(provider: str, count: int, subscriptions: Path | None) -> list[Device]:
    if provider == "apns":
        return [Device(i, secrets.token_hex(32), TOPIC, "production") for i in range(count)]
    if provider == "fcm":
        return [Device(i, secrets.token_urlsafe(120)) for i in range(count)]
    assert subscriptions is not None, "--subscriptions: the fake's Web Push subscriptions"
    lines = subscriptions.read_text().splitlines()
    return [Device(i, lines[i % len(lines)]) for i in range(count)]


def make_provider(name: str):
    if name == "apns":
        from shared.providers.apns import ApnsProvider

        return ApnsProvider.from_env()  # signs its own provider token: no database here
    if name == "fcm":
        from shared.providers.fcm import FcmProvider

        return FcmProvider.from_env()
    from shared.providers.webpush import WebPushProvider

    return WebPushProvider.from_env()


async def run(args: argparse.Namespace) -> dict:
    provider = make_provider(args.provider)
    targets = devices(args.provider, args.concurrency, args.subscriptions)
    wakeup = WakeUp("checkEchoV1", 86400)
    await asyncio.gather(*(provider.send(d, wakeup) for d in targets))  # connections, tokens
    rounds = max(1, args.sends // len(targets))
    outcomes: dict[str, int] = {}
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        for result in await asyncio.gather(*(provider.send(d, wakeup) for d in targets)):
            outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await provider.aclose()
    sends = rounds * len(targets)
    return {"sends": sends, "cpu_us_per_send": round(cpu / sends * 1e6, 1),
            "sends_per_second": round(sends / wall, 1), "outcomes": outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("provider", choices=("apns", "fcm", "webpush"))
    parser.add_argument("--sends", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--subscriptions", type=Path)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as under uvicorn
        print(json.dumps(runner.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
