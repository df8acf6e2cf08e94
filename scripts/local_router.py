"""A local stand-in for the Knative broker, for `make run`: routes CloudEvents to the functions
exactly as the Triggers in knative/ say.

It reads every Trigger under knative/ (so the local wiring is the production wiring) and the
Broker's delivery settings (retries and backoff). Each CloudEvent posted to it (binary or
structured mode) is answered 202 at once, then delivered in binary mode, like the broker, to
the local URL of every Service whose Trigger filter matches the event's attributes. A delivery
answered 5xx, 404, 408, 409 or 429, or not answered at all, is retried with the Broker's backoff
(the broker's rules); what still fails is logged as dead-lettered. A 2xx answer carrying a
CloudEvent (ce- headers, as the dispatchers' dead-token reports when no K_SINK is bound) is
routed again through the same Triggers, which is how those reports reach cleanup-invalid-tokens.

    python scripts/local_router.py --port 8080 \\
        --service dispatch-fcm=http://127.0.0.1:8083/ ... [--manifests knative]

It depends on nothing of this repository but the manifests (PyYAML reads them).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RETRYABLE = {404, 408, 409, 429}
REQUIRED = ("specversion", "id", "source", "type")
MAX_BODY = 1024 * 1024
#: CloudEvents attributes that are not ce- headers in binary mode.
CONTENT_TYPE = "datacontenttype"


@dataclass(frozen=True)
class Route:
    trigger: str
    attributes: dict[str, str]
    subscriber: str
    url: str

    def matches(self, event: Event) -> bool:
        return all(event.attributes.get(key) == value for key, value in self.attributes.items())


@dataclass(frozen=True)
class Delivery:
    """The Broker's delivery spec: retries, backoff and the dead-letter sink's name."""

    retry: int = 3
    backoff_policy: str = "exponential"
    backoff_delay: float = 1.0
    dead_letter: str | None = None

    def delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based)."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * attempt
        return self.backoff_delay * 2 ** (attempt - 1)


@dataclass
class Event:
    attributes: dict[str, str]
    data: bytes = b""
    extra_headers: dict[str, str] = field(default_factory=dict)

    def binary(self) -> tuple[dict[str, str], bytes]:
        headers = {f"ce-{key}": value for key, value in self.attributes.items() if key != CONTENT_TYPE}
        if CONTENT_TYPE in self.attributes:
            headers["Content-Type"] = self.attributes[CONTENT_TYPE]
        return headers, self.data

    def describe(self) -> str:
        return f"{self.attributes.get('type')} id={self.attributes.get('id')}"


class NotAnEvent(ValueError):
    pass


def parse_event(headers: dict[str, str], body: bytes) -> Event:
    """A CloudEvent from an HTTP request or response, binary or structured mode."""
    lowered = {key.lower(): value for key, value in headers.items()}
    content_type = lowered.get("content-type", "")
    if "ce-specversion" in lowered:
        attributes = {key[3:]: value for key, value in lowered.items() if key.startswith("ce-")}
        if content_type:
            attributes[CONTENT_TYPE] = content_type
        event = Event(attributes, body)
    elif content_type.startswith("application/cloudevents+json"):
        try:
            document = json.loads(body)
        except ValueError:
            raise NotAnEvent("a structured CloudEvent must be JSON") from None
        if not isinstance(document, dict):
            raise NotAnEvent("a structured CloudEvent must be a JSON object")
        attributes = {k: str(v) for k, v in document.items() if k not in ("data", "data_base64")}
        if "data_base64" in document:
            data = base64.b64decode(document["data_base64"])
        elif "data" in document:
            value = document["data"]
            data = value.encode() if isinstance(value, str) else json.dumps(value).encode()
            if not isinstance(value, str):
                attributes.setdefault(CONTENT_TYPE, "application/json")
        else:
            data = b""
        event = Event(attributes, data)
    else:
        raise NotAnEvent("not a CloudEvent: no ce-specversion header and not application/cloudevents+json")
    missing = [name for name in REQUIRED if not event.attributes.get(name)]
    if missing:
        raise NotAnEvent(f"missing attribute(s): {', '.join(missing)}")
    return event


def manifest_documents(folder: Path) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(folder.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return documents


def load_routes(folder: Path, services: dict[str, str]) -> tuple[list[Route], Delivery]:
    """The Triggers under ``folder`` as routes to the local ``services`` URLs, and the Broker's
    delivery settings."""
    documents = manifest_documents(folder)
    routes = []
    for trigger in (d for d in documents if d.get("kind") == "Trigger"):
        name = trigger["metadata"]["name"]
        spec = trigger.get("spec", {})
        if spec.get("filters"):
            raise SystemExit(f"Trigger {name}: only `filter.attributes` (exact match) is supported locally")
        subscriber = spec.get("subscriber", {})
        ref = subscriber.get("ref", {})
        target = ref.get("name") or subscriber.get("uri", "")
        url = services.get(target) or (target if re.match(r"https?://", target) else None)
        if url is None:
            print(f"router: Trigger {name}: no local URL for {target!r}; its events are dropped", flush=True)
            continue
        attributes = {k: str(v) for k, v in (spec.get("filter", {}).get("attributes") or {}).items()}
        routes.append(Route(name, attributes, target, url))
    delivery = Delivery()
    for broker in (d for d in documents if d.get("kind") == "Broker"):
        spec = (broker.get("spec") or {}).get("delivery") or {}
        delivery = Delivery(
            retry=int(spec.get("retry", delivery.retry)),
            backoff_policy=spec.get("backoffPolicy", delivery.backoff_policy),
            backoff_delay=iso_seconds(spec.get("backoffDelay", "PT1S")),
            dead_letter=((spec.get("deadLetterSink") or {}).get("ref") or {}).get("name"),
        )
    return routes, delivery


def iso_seconds(duration: str) -> float:
    """Seconds of an ISO 8601 duration of the PT...H...M...S kind Knative uses."""
    match = re.fullmatch(r"PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", duration or "")
    if not match:
        raise ValueError(f"not an ISO 8601 duration: {duration!r}")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class Router:
    def __init__(self, routes: list[Route], delivery: Delivery, timeout: float = 120.0,
                 max_hops: int = 4) -> None:
        self.routes = routes
        self.delivery = delivery
        self.timeout = timeout
        self.max_hops = max_hops

    def accept(self, event: Event, hops: int = 0) -> int:
        """Start delivering ``event`` to every matching route; how many matched."""
        matched = [route for route in self.routes if route.matches(event)]
        if not matched:
            log(f"{event.describe()}: no Trigger matches; dropped")
        for route in matched:
            threading.Thread(target=self.deliver, args=(route, event, hops), daemon=True).start()
        return len(matched)

    def deliver(self, route: Route, event: Event, hops: int) -> None:
        headers, body = event.binary()
        for attempt in range(self.delivery.retry + 1):
            if attempt:
                time.sleep(self.delivery.delay(attempt))
            status, reply_headers, reply_body, error = self.post(route.url, headers, body)
            outcome = error or f"HTTP {status}"
            if status is not None and 200 <= status < 300:
                reply = None
                try:
                    reply = parse_event(reply_headers, reply_body) if reply_body or "ce-specversion" in {
                        k.lower() for k in reply_headers} else None
                except NotAnEvent:
                    # The broker's rule: a 2xx whose body is neither empty nor an event failed.
                    outcome = f"HTTP {status} with a body that is not a CloudEvent"
                else:
                    log(f"{event.describe()} -> {route.subscriber}: {outcome}"
                        + (f", replied {reply.describe()}" if reply else ""))
                    if reply is not None:
                        if hops >= self.max_hops:
                            log(f"{reply.describe()}: too many reply hops; dropped")
                        else:
                            self.accept(reply, hops + 1)
                    return
            elif status is not None and status < 500 and status not in RETRYABLE:
                log(f"{event.describe()} -> {route.subscriber}: {outcome}, refused for good"
                    f"{': ' + reply_body[:200].decode(errors='replace') if reply_body else ''}")
                return
            if attempt < self.delivery.retry:
                log(f"{event.describe()} -> {route.subscriber}: {outcome}; retry {attempt + 1} of "
                    f"{self.delivery.retry} in {self.delivery.delay(attempt + 1):g} s")
        log(f"{event.describe()} -> {route.subscriber}: still failing after {self.delivery.retry} "
            f"retries; dead-lettered (to {self.delivery.dead_letter or 'nowhere'} in a cluster)")

    def post(self, url: str, headers: dict[str, str], body: bytes
             ) -> tuple[int | None, dict[str, str], bytes, str | None]:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, dict(response.headers.items()), response.read(), None
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers.items()), error.read(), None
        except (OSError, urllib.error.URLError) as error:
            return None, {}, b"", f"not reachable ({getattr(error, 'reason', error)})"


def log(message: str) -> None:
    print(f"router: {message}", flush=True)


def make_handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path in ("/healthz", "/readyz", "/_/health", "/_/ready"):
                self.answer(200, {"routes": [r.trigger for r in router.routes]})
            else:
                self.answer(405, {"error": "POST a CloudEvent"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.answer(413, {"error": "too large"})
                return
            body = self.rfile.read(length)
            try:
                event = parse_event(dict(self.headers.items()), body)
            except NotAnEvent as error:
                self.answer(400, {"error": str(error)})
                return
            matched = router.accept(event)
            self.answer(202, {"id": event.attributes["id"], "routes": matched})

        def answer(self, status: int, document: dict[str, Any]) -> None:
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def parse_services(pairs: list[str]) -> dict[str, str]:
    services = {}
    for pair in pairs:
        name, separator, url = pair.partition("=")
        if not separator or not url:
            raise SystemExit(f"--service takes NAME=URL, not {pair!r}")
        services[name] = url
    return services


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--manifests", type=Path, default=REPO / "knative", help="where the Triggers are")
    parser.add_argument("--service", action="append", default=[], metavar="NAME=URL",
                        help="the local URL of a Knative Service a Trigger names (repeat)")
    args = parser.parse_args(argv)
    routes, delivery = load_routes(args.manifests, parse_services(args.service))
    router = Router(routes, delivery)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(router))
    server.daemon_threads = True
    for route in routes:
        filters = ", ".join(f"{k}={v}" for k, v in route.attributes.items()) or "every event"
        log(f"Trigger {route.trigger}: {filters} -> {route.subscriber} ({route.url})")
    log(f"listening on http://{args.host}:{server.server_address[1]}/ "
        f"({delivery.retry} retries, {delivery.backoff_policy} from {delivery.backoff_delay:g} s)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
