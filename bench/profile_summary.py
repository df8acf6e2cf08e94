"""Summarise py-spy raw (collapsed-stack) profiles: `python bench/profile_summary.py FILE [FILE ...]
[--top N] [--focus SUBSTRING] [--layers]`. Prints the share of samples whose stack contains each
function (inclusive) and the share where it is the leaf (self), the top N of each; with
--layers, the share of each layer of a request's path (of LAYERS, in their
order: the first its stack reaches), which is what docs/performance.md quotes."""
from __future__ import annotations

import argparse
import re
from collections import Counter

LAYERS = (
    # (layer, a frame of it: the function and file as py-spy names them, a substring)
    ("database work in threads (SQLAlchemy, PyMySQL/sqlite3)", "run_transaction (shared/db.py)"),
    ("database: handing work to threads and back", "Batcher._drain (shared/batching.py)"),
    ("database: handing work to threads and back", "run_in_threadpool (starlette/concurrency.py)"),
    ("database: handing work to threads and back", "(concurrent/futures/thread.py)"),
    ("database: handing work to threads and back", "(anyio/"),
    ("reading the CloudEvent", "read_cloud_event (shared/events.py)"),
    ("the event's log line", "(logging/__init__.py)"),
    ("sending: provider client and HTTP/2 (h2, hpack)", "(shared/providers/"),
    ("sending: provider client and HTTP/2 (h2, hpack)", "(shared/transport/"),
    ("sending: provider client and HTTP/2 (h2, hpack)", "(h2/"),
    ("metrics", "(prometheus_client/"),
    ("uvicorn (HTTP parsing, the response's write)", "RequestResponseCycle.send (uvicorn/"),
    ("the dispatcher's own work (admission, tasks, the report; serve() under it)", "(shared/dispatch/"),
    ("the dispatcher's own work (admission, tasks, the report; serve() under it)", "(shared/dispatch.py)"),
    ("the dispatcher's own work (admission, tasks, the report; serve() under it)", "(shared/holds.py)"),
    ("the function's request handling (shared/http.py, subscribe's API)", "(shared/"),
    ("functions-framework and Starlette (middleware, routing, Request/Response)", "(functions_framework/"),
    ("functions-framework and Starlette (middleware, routing, Request/Response)", "(starlette/"),
    ("uvicorn (HTTP parsing, the response's write)", "(uvicorn/"),
)


def layer_of(frames: list[str]) -> str:
    """The first layer of LAYERS that any frame of the stack belongs to: the order says which
    layer a sample counts for when its stack crosses several (a push's send inside the
    dispatcher's logic inside the function's request handling)."""
    stack = ";".join(frames)
    for layer, marker in LAYERS:
        if marker in stack:
            return layer
    return "other (the event loop itself, idle threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--focus", help="only stacks containing this substring")
    parser.add_argument("--layers", action="store_true", help="shares by layer of the request path")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for path in args.files:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not count.isdigit() or (args.focus and args.focus not in stack):
                    continue
                n = int(count)
                frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
                total += n
                for frame in set(frames):
                    inclusive[frame] += n
                leaf[frames[-1]] += n
                layers[layer_of(frames)] += n
    print(f"{total} samples")
    if args.layers:
        print("-- layers --")
        for layer, n in layers.most_common():
            print(f"{100 * n / total:6.1f}%  {layer}")
        return
    print("-- inclusive --")
    for frame, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")
    print("-- self --")
    for frame, n in leaf.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
