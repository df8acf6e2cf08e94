"""Post a notification event to the local router, as Echo would post it to the broker.

    python scripts/post_event.py --user 1                 # wake user 1's devices
    python scripts/post_event.py --user 1 --user 2 --event-type mention --dry-run

It sends an org.wikimedia.push.notification.requested.v1 CloudEvent (binary mode) to the router
`make run` starts (http://127.0.0.1:8080/, or PUSH_LOCAL_BASE_PORT's port), which delivers it to
the dispatchers as the Knative Triggers do. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid

NOTIFICATION_REQUESTED = "org.wikimedia.push.notification.requested.v1"


def default_router() -> str:
    return f"http://127.0.0.1:{int(os.environ.get('PUSH_LOCAL_BASE_PORT') or 8080)}/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--user", action="append", required=True, help="a user id to notify (repeat)")
    parser.add_argument("--message-type", default="checkEchoV1", help="the wake-up's type")
    parser.add_argument("--event-type", default="edit-user-talk", help="Echo's event type")
    parser.add_argument("--ttl", type=int, help="seconds a push service may hold the wake-up")
    parser.add_argument("--dry-run", action="store_true", help="check everything, wake nobody")
    parser.add_argument("--id", default=None, help="the event id (default: a new one; reuse one "
                        "to see a redelivery skip the devices already woken)")
    parser.add_argument("--router", default=default_router(), help="where to post (default: %(default)s)")
    args = parser.parse_args(argv)

    data = {"users": args.user, "message_type": args.message_type, "event_type": args.event_type}
    if args.dry_run:
        data["dry_run"] = True
    if args.ttl is not None:
        data["ttl_seconds"] = args.ttl
    event_id = args.id or str(uuid.uuid4())
    headers = {
        "ce-specversion": "1.0",
        "ce-type": NOTIFICATION_REQUESTED,
        "ce-source": "/local/post_event",
        "ce-id": event_id,
        "Content-Type": "application/json",
    }
    request = urllib.request.Request(
        args.router, data=json.dumps(data).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        answer, status = error.read().decode(errors="replace"), error.code
    except OSError as error:
        print(f"could not reach the router at {args.router}: {error} (is `make run` running?)", file=sys.stderr)
        return 1
    print(f"event {event_id} for user(s) {', '.join(args.user)}: router answered {status} {answer}")
    return 0 if status == 202 else 1


if __name__ == "__main__":
    sys.exit(main())
