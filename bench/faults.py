"""What a crash costs: `python bench/faults.py [--kills N] [--devices N] [--rtt-ms MS]`.

dispatch-fcm, started by the image's command, is SIGKILLed at a random send of a fresh N-device
event (one device per user), and the event is redelivered to a fresh process once the claim
lease ran out; the FCM fake (in this process, fakes/fcm.py) counts every wake-up per device and
kills the process itself at the chosen send, so the moment is exact (tests/crash.py). For each
kill: the devices the fake had answered before the kill, those in flight (sent, not yet
answered: sent again by design), those sent twice, of these the ones beyond the in-flight
sends (answered, but not yet recorded, or not yet read, by the killed process) and the ones
beyond the send concurrency (read but not yet recorded, at least); lost ones (never sent) too.

Prints one JSON line per kill and a summary (min, median, max over the kills) on stdout,
progress on stderr. Needs MariaDB at 127.0.0.1:3306 (PUSH_BENCH_MARIADB overrides the server
URL); uses its own database, push_bench_faults, emptied first. Nothing here asserts: the
suite's test_a_sigkill_late_in_an_event_resends_at_most_what_was_on_the_wire_and_the_recorders_room
holds the recorder's bound on two late kills.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fakes.server import Network  # noqa: E402
from tests import crash, stores  # noqa: E402

DB_SERVER = os.environ.get("PUSH_BENCH_MARIADB", "mysql+pymysql://root@127.0.0.1:3306")
DB_NAME = "push_bench_faults"
DATABASE_URL = f"{DB_SERVER}/{DB_NAME}?charset=utf8mb4"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_database(devices: int, environment: dict[str, str]) -> tuple[list[str], list[str]]:
    """A migrated, empty push_bench_faults with ``devices`` FCM devices, one per user."""
    from sqlalchemy import create_engine, text

    from shared.db import get_engine
    from shared.models import Base
    from shared.subscriptions import NewSubscription, SubscriptionStore

    server = create_engine(DB_SERVER)
    with server.begin() as connection:
        connection.execute(text(f"CREATE DATABASE IF NOT EXISTS {DB_NAME} CHARACTER SET utf8mb4"))
    server.dispose()
    subprocess.run([str(Path(sys.executable).parent / "pushctl"), "migrate"], env=environment, check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    engine = get_engine(DATABASE_URL)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    store = SubscriptionStore(engine)
    users, tokens = [f"crash-user-{i}" for i in range(devices)], []
    for user in users:
        token = f"crash-{user}-{os.urandom(8).hex()}"
        stores.subscribe(store, user, NewSubscription("fcm", token, token))
        tokens.append(token)
    engine.dispose()
    return users, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="the fake's round trip on every answer")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="push-bench-faults-"))
    with crash.CountingFcm(network=Network(rtt=args.rtt_ms / 1000)) as fake:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")} | {
            "PUSH_DATABASE_URL": DATABASE_URL,
            "PUSH_FCM_CREDENTIALS": str(fake.write_service_account(work / "fcm-sa.json")),
            "PUSH_FCM_ENDPOINT": fake.endpoint, "PUSH_FCM_CA_FILE": fake.ca_path,
        }
        users, tokens = prepare_database(args.devices, environment)
        log(f"{args.kills} kills of {args.devices}-device events (seed {seed}, rtt {args.rtt_ms:g} ms); "
            f"dispatcher logs in {work / 'dispatch-fcm.log'}")
        kills: list[crash.KillCount] = []
        with crash.dispatchers(environment, work / "dispatch-fcm.log") as fresh:
            current = next(fresh)
            assert crash.post(current, crash.events.notification(users, id_="warm-up")) == 202
            for number in range(1, args.kills + 1):
                following = next(fresh)
                kill = crash.kill_once(fake, current, following, users, tokens, f"crash-{seed}-{number}",
                                       rng.randint(1, len(tokens)))
                kills.append(kill)
                print(json.dumps({"name": "sigkill", "kill": number, **crash.as_dict(kill)}), flush=True)
                log(f"kill {number}: {kill}")
                current = following
    print(json.dumps({"name": "sigkill_summary", "devices": args.devices, "rtt_ms": args.rtt_ms, "seed": seed,
                      **crash.summary(kills)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
