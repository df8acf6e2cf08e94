"""Post a notification event to the local router, as Echo would post it to the broker, and show
what each dispatcher answered.

    python scripts/post_event.py --user 1                 # wake user 1's devices
    python scripts/post_event.py --user 1 --user 2 --event-type mention --dry-run

It sends an org.wikimedia.push.notification.requested.v1 CloudEvent (binary mode) to the router
`make run` starts (http://127.0.0.1:8080/, or the port `make run` was moved to with
PUSH_LOCAL_BASE_PORT), which delivers it to the dispatchers as the Knative Triggers do, and waits
for their first answers. It exits non-zero when a dispatcher refused the event (or none was
reached); an answer asking for a retry is not a refusal: the router retries as the broker would.
Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # shared/, when the package is not installed

from shared.localenv import FILE_NAME, local_dir, read_settings  # noqa: E402 - after the path

NOTIFICATION_REQUESTED = "org.wikimedia.push.notification.requested.v1"


def default_router() -> str:
    """The router of the running local stack: PUSH_LOCAL_BASE_PORT, else the port `make run`
    wrote to its settings file, else 8080."""
    port = os.environ.get("PUSH_LOCAL_BASE_PORT")
    settings = local_dir(REPO) / FILE_NAME
    if not port and settings.is_file():
        port = read_settings(settings).get("PUSH_LOCAL_BASE_PORT")
    return f"http://127.0.0.1:{int(port or 8080)}/"


def describe(answer: dict) -> tuple[bool, str]:
    """Whether a dispatcher refused the event, and its answer in words."""
    status, body = answer.get("status"), answer.get("body") or ""
    if status is None:
        return True, f"not reached: {answer.get('error')}"
    if 200 <= status < 300:
        report = " (and reported dead tokens, routed to clean-up)" if status == 200 and body else ""
        return False, f"{status} done{report}"
    try:
        error = json.loads(body)["error"]
        detail = f"{error['code']}: {error['message']}" + (f" [{error['field']}]" if error.get("field") else "")
    except (ValueError, KeyError, TypeError):
        detail = body.strip()[:200]
    if status == 429 or status >= 500:
        return False, f"{status} retry later ({detail}); the router retries it"
    return True, f"{status} refused: {detail}"


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
        args.router.rstrip("/") + "/?wait=1", data=json.dumps(data).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=150) as response:
            routed = json.loads(response.read())
    except urllib.error.HTTPError as error:
        print(f"the router refused the event: {error.code} {error.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except OSError as error:
        print(f"could not reach the router at {args.router}: {error} (is `make run` running?)", file=sys.stderr)
        return 1
    print(f"event {event_id} for user(s) {', '.join(args.user)}:")
    refused = not routed.get("answers")
    if refused:
        print("  no dispatcher's Trigger matched it")
    for answer in routed.get("answers", []):
        failed, words = describe(answer)
        refused |= failed
        print(f"  {answer['subscriber']:<18} {words}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
