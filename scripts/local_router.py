"""A local stand-in for the Knative broker, for `make run`: routes CloudEvents to the functions
exactly as the Triggers in knative/ say, and retries and dead-letters them as the broker does.

It reads the resources of knative/'s kustomization and of every component (each provider's
Triggers among them: the local wiring is the production wiring) and the Broker's delivery spec.
Each CloudEvent posted to it (binary or structured mode) is answered 202 at once, then delivered
in binary mode, like the broker, to the local URL of every Service whose Trigger filter matches
the event's attributes, each attempt cut off after the spec's `timeout`. A delivery answered
5xx, 404, 408, 409 or 429, or not answered at all, is retried as the Kafka broker spaces its
retries (backoffDelay x n for linear, x 2^n for exponential, before retry n; a Trigger's own
delivery fields override the Broker's); a 429 or 503 waits at least its Retry-After, capped at
retryAfterMax, as a broker with the retry-after component does. What still fails goes to the
dead-letter sink (cleanup-invalid-tokens' /dead-letters, which keeps it in the database) with
Knative's error attributes (knativeerrordest, knativeerrorcode, knativeerrordata). A 2xx answer
carrying a CloudEvent (ce- headers, as the dispatchers' dead-token reports when no K_SINK is
bound) is routed again through the same Triggers, which is how those reports reach
cleanup-invalid-tokens.

Posted to ``/?wait=1`` (as scripts/post_event.py does), the router answers only once every
matching Service has answered its first delivery, with each answer: ``{"id", "routes",
"answers": [{"subscriber", "status", "body", "error"}]}``. Retries still follow in the background.

    python scripts/local_router.py --port 8080 \\
        --service dispatch-fcm=http://127.0.0.1:8083/ ... [--manifests knative] [--time-scale 1]

It also runs the PingSources of those manifests on their schedules (minute precision, UTC): a
sink that is the Broker gets the tick routed like any event (so clean-up's reply to the held-work
tick reaches the dispatchers), a sink that is a Service gets it posted (its reply ignored, as a
PingSource ignores it).

--time-scale multiplies every wait (backoff and Retry-After) so tests can live through an hour
of retries in seconds. It depends on nothing of this repository but the manifests (PyYAML).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RETRYABLE = {404, 408, 409, 429}
#: The answers whose Retry-After a broker honouring it reads.
RETRY_AFTER_STATUSES = {429, 503}
REQUIRED = ("specversion", "id", "source", "type")
MAX_BODY = 1024 * 1024
#: How much of a failed answer's body goes into knativeerrordata (Knative's limit).
ERROR_DATA_MAX = 1024
#: CloudEvents attributes that are not ce- headers in binary mode.
CONTENT_TYPE = "datacontenttype"


@dataclass(frozen=True)
class Delivery:
    """A delivery spec: retries, backoff, the per-attempt timeout, Retry-After's cap and the
    dead-letter sink (its local URL)."""

    retry: int = 3
    backoff_policy: str = "exponential"
    backoff_delay: float = 1.0
    timeout: float = 600.0
    retry_after_max: float | None = None
    dead_letter: str | None = None

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``attempt`` (1-based), as the Kafka broker computes them;
        at least ``retry_after`` (capped at retryAfterMax) when the broker honours it."""
        if self.backoff_policy == "linear":
            backoff = self.backoff_delay * attempt
        else:
            backoff = self.backoff_delay * 2 ** attempt
        if retry_after is not None and self.retry_after_max is not None:
            return max(backoff, min(retry_after, self.retry_after_max))
        return backoff

    def merged(self, spec: dict[str, Any], services: dict[str, str]) -> Delivery:
        """This delivery with a Trigger's own fields in place of these (the Kafka broker's rule:
        field by field)."""
        changes: dict[str, Any] = {}
        if "retry" in spec:
            changes["retry"] = int(spec["retry"])
        if "backoffPolicy" in spec:
            changes["backoff_policy"] = spec["backoffPolicy"]
        for key, name in (("backoffDelay", "backoff_delay"), ("timeout", "timeout"), ("retryAfterMax", "retry_after_max")):
            if key in spec:
                changes[name] = iso_seconds(spec[key])
        if spec.get("deadLetterSink"):
            changes["dead_letter"] = destination_url(spec["deadLetterSink"], services)
        return replace(self, **changes)


@dataclass(frozen=True)
class Route:
    trigger: str
    attributes: dict[str, str]
    subscriber: str
    url: str
    delivery: Delivery = Delivery()

    def matches(self, event: Event) -> bool:
        return all(event.attributes.get(key) == value for key, value in self.attributes.items())


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


def kustomizations(folder: Path) -> list[dict[str, Any]]:
    """``folder``'s kustomization and every component's under it, each with its folder."""
    return [
        {**(yaml.safe_load(path.read_text()) or {}), "folder": path.parent}
        for path in sorted(folder.rglob("kustomization.yaml"))
    ]


def manifest_documents(folder: Path) -> list[dict[str, Any]]:
    """The resources the kustomizations under ``folder`` list (patches are not resources)."""
    documents = []
    for spec in kustomizations(folder):
        for entry in spec.get("resources", []):
            path = spec["folder"] / entry
            documents += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return documents


def retry_after_max(folder: Path) -> float | None:
    """retryAfterMax as the retry-after component (or the Broker itself) sets it."""
    for spec in kustomizations(folder):
        for patch in spec.get("patches", []):
            for operation in yaml.safe_load(patch.get("patch", "")) or []:
                if isinstance(operation, dict) and operation.get("path") == "/spec/delivery/retryAfterMax":
                    return iso_seconds(operation["value"])
    return None


def destination_url(destination: dict[str, Any], services: dict[str, str]) -> str | None:
    """A Knative Destination's local URL: the Service's, with ``uri`` resolved against it."""
    name = (destination.get("ref") or {}).get("name")
    uri = destination.get("uri") or ""
    if name is None:
        return uri if re.match(r"https?://", uri) else None
    base = services.get(name)
    return urllib.parse.urljoin(base, uri) if base and uri else base


def load_routes(folder: Path, services: dict[str, str]) -> tuple[list[Route], Delivery]:
    """The Triggers under ``folder`` as routes to the local ``services`` URLs, each with its
    delivery spec (the Broker's, with the Trigger's own fields in place), and the Broker's."""
    documents = manifest_documents(folder)
    delivery = Delivery(retry_after_max=retry_after_max(folder))
    for broker in (d for d in documents if d.get("kind") == "Broker"):
        delivery = delivery.merged((broker.get("spec") or {}).get("delivery") or {}, services)
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
        routes.append(Route(name, attributes, target, url, delivery.merged(spec.get("delivery") or {}, services)))
    return routes, delivery


def iso_seconds(duration: str) -> float:
    """Seconds of an ISO 8601 duration of the PT...H...M...S kind Knative uses."""
    match = re.fullmatch(r"PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", duration or "")
    if not match:
        raise ValueError(f"not an ISO 8601 duration: {duration!r}")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class PingSource:
    name: str
    schedule: str
    attributes: dict[str, str]
    """The tick's extension attributes (``ceOverrides.extensions``)."""
    sink: str | None
    """The local URL of a Service sink; ``None``: the Broker."""

    def due(self, when: time.struct_time) -> bool:
        """Whether the cron ``schedule`` (5 fields: numbers, ``*``, ``*/n``, ``a-b``, lists)
        names the minute ``when``."""
        values = (when.tm_min, when.tm_hour, when.tm_mday, when.tm_mon, (when.tm_wday + 1) % 7)
        return all(cron_field_matches(field, value) for field, value in zip(self.schedule.split(), values))

    def event(self, when: time.struct_time) -> Event:
        return Event({"specversion": "1.0", "type": "dev.knative.sources.ping",
                      "source": f"/apis/v1/namespaces/local/pingsources/{self.name}",
                      "id": f"{self.name}-{time.strftime('%Y%m%dT%H%M', when)}", **self.attributes})


def cron_field_matches(field: str, value: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            low, high = 0, 59
        elif "-" in base:
            low, high = (int(x) for x in base.split("-", 1))
        else:
            low = high = int(base)
        if low <= value <= high and (value - low) % int(step or 1) == 0:
            return True
    return False


def deployed_documents(folder: Path) -> list[dict[str, Any]]:
    """The resources of ``folder``'s kustomization and of the components it lists (not those it
    leaves out, such as the privacy delay's once-a-minute PingSource by default)."""
    top = yaml.safe_load((folder / "kustomization.yaml").read_text()) or {}
    documents = []
    for base in [folder, *(folder / c for c in top.get("components") or [])]:
        spec = yaml.safe_load((base / "kustomization.yaml").read_text()) or {}
        for entry in spec.get("resources", []):
            documents += [d for d in yaml.safe_load_all((base / entry).read_text()) if isinstance(d, dict)]
    return documents


def load_ping_sources(folder: Path, services: dict[str, str]) -> list[PingSource]:
    """The PingSources deployed from ``folder``, each with its sink's local URL."""
    sources = []
    for document in (d for d in deployed_documents(folder) if d.get("kind") == "PingSource"):
        spec = document.get("spec", {})
        ref = (spec.get("sink") or {}).get("ref") or {}
        sink = None if ref.get("kind") == "Broker" else destination_url(spec.get("sink") or {}, services)
        if sink is None and ref.get("kind") != "Broker":
            continue
        extensions = ((spec.get("ceOverrides") or {}).get("extensions") or {})
        sources.append(PingSource(document["metadata"]["name"], spec["schedule"],
                                  {k: str(v) for k, v in extensions.items()}, sink))
    return sources


class Router:
    def __init__(self, routes: list[Route], delivery: Delivery, max_hops: int = 4, time_scale: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.routes = routes
        self.delivery = delivery
        self.max_hops = max_hops
        self.time_scale = time_scale
        self.sleep = sleep

    def ping(self, source: PingSource, when: time.struct_time) -> None:
        """Deliver ``source``'s tick for the minute ``when``."""
        event = source.event(when)
        if source.sink is None:
            self.accept(event)
        else:
            headers, body = event.binary()
            threading.Thread(target=self.post, args=(source.sink, headers, body, self.delivery.timeout),
                             daemon=True).start()

    def run_schedules(self, sources: list[PingSource]) -> None:
        """Tick each PingSource on its schedule, for ever (a daemon thread's work)."""
        last = None
        while True:
            now = time.gmtime()
            minute = now[:5]
            if minute != last:
                last = minute
                for source in sources:
                    if source.due(now):
                        log(f"PingSource {source.name}: tick")
                        self.ping(source, now)
            self.sleep_real(1.0)

    sleep_real = staticmethod(time.sleep)

    def accept(self, event: Event, hops: int = 0) -> int:
        """Start delivering ``event`` to every matching route; how many matched."""
        return len(self.start(event, hops))

    def start(self, event: Event, hops: int = 0) -> list[tuple[Route, concurrent.futures.Future]]:
        """Start delivering ``event`` to every matching route; each route, with the future of
        its first answer (status, body, error), for a poster that waits for it."""
        matched = [route for route in self.routes if route.matches(event)]
        if not matched:
            log(f"{event.describe()}: no Trigger matches; dropped")
        started = []
        for route in matched:
            first: concurrent.futures.Future = concurrent.futures.Future()
            threading.Thread(target=self.deliver, args=(route, event, hops, first), daemon=True).start()
            started.append((route, first))
        return started

    def deliver(self, route: Route, event: Event, hops: int,
                first: concurrent.futures.Future | None = None) -> None:
        delivered, status, body = self.send(route.subscriber, route.url, route.delivery, event, hops, first)
        if delivered:
            return
        if status is not None and status < 500 and status not in RETRYABLE:
            return  # refused for good: not dead-lettered, as the broker does
        self.dead_letter(route, event, status, body)

    def send(self, name: str, url: str, delivery: Delivery, event: Event, hops: int,
             first: concurrent.futures.Future | None = None) -> tuple[bool, int | None, bytes]:
        """Post ``event`` until it is taken or the retries run out: (taken, last status, body).
        ``first`` gets the first attempt's answer."""
        headers, body = event.binary()
        status: int | None = None
        reply_body = b""
        for attempt in range(delivery.retry + 1):
            status, reply_headers, reply_body, error = self.post(url, headers, body, delivery.timeout)
            if first is not None and not first.done():
                first.set_result((status, reply_body.decode(errors="replace")[:1000], error))
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
                    log(f"{event.describe()} -> {name}: {outcome}" + (f", replied {reply.describe()}" if reply else ""))
                    if reply is not None:
                        if hops >= self.max_hops:
                            log(f"{reply.describe()}: too many reply hops; dropped")
                        else:
                            self.accept(reply, hops + 1)
                    return True, status, reply_body
            elif status is not None and status < 500 and status not in RETRYABLE:
                log(f"{event.describe()} -> {name}: {outcome}, refused for good"
                    f"{': ' + reply_body[:200].decode(errors='replace') if reply_body else ''}")
                return False, status, reply_body
            if attempt < delivery.retry:
                retry_after = retry_after_seconds(reply_headers) if status in RETRY_AFTER_STATUSES else None
                wait = delivery.delay(attempt + 1, retry_after)
                log(f"{event.describe()} -> {name}: {outcome}; retry {attempt + 1} of {delivery.retry} in {wait:g} s"
                    + (f" (scaled to {wait * self.time_scale:g} s)" if self.time_scale != 1 else ""))
                self.sleep(wait * self.time_scale)
        return False, status, reply_body

    def dead_letter(self, route: Route, event: Event, status: int | None, body: bytes) -> None:
        """What failed every retry goes to the dead-letter sink, as the broker sends it there:
        with the error attributes, and with the same retries."""
        sink = route.delivery.dead_letter
        if sink is None:
            log(f"{event.describe()} -> {route.subscriber}: still failing after {route.delivery.retry} retries; "
                "no dead-letter sink: lost")
            return
        errors = {
            "knativeerrordest": route.url,
            "knativeerrorcode": str(status if status is not None else -1),
            "knativeerrordata": base64.b64encode(body[:ERROR_DATA_MAX]).decode(),
        }
        letter = Event({**event.attributes, **errors}, event.data)
        taken, *_ = self.send("dead-letter sink", sink, route.delivery, letter, self.max_hops)
        log(f"{event.describe()} -> {route.subscriber}: still failing after {route.delivery.retry} retries; "
            + ("dead-lettered" if taken else "the dead-letter sink did not take it either: lost"))

    def post(self, url: str, headers: dict[str, str], body: bytes, timeout: float
             ) -> tuple[int | None, dict[str, str], bytes, str | None]:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers.items()), response.read(), None
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers.items()), error.read(), None
        except (OSError, urllib.error.URLError) as error:
            return None, {}, b"", f"not reachable ({getattr(error, 'reason', error)})"


def retry_after_seconds(headers: dict[str, str]) -> float | None:
    """A Retry-After header's seconds (the dispatchers send whole seconds); None if absent."""
    value = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


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
            started = router.start(event)
            answer: dict[str, Any] = {"id": event.attributes["id"], "routes": len(started)}
            if "wait" not in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query):
                self.answer(202, answer)
                return
            answer["answers"] = []
            for route, first in started:
                try:
                    status, text, error = first.result(timeout=route.delivery.timeout + 5)
                except concurrent.futures.TimeoutError:
                    status, text, error = None, "", "no answer"
                answer["answers"].append(
                    {"subscriber": route.subscriber, "status": status, "body": text, "error": error}
                )
            self.answer(200, answer)

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
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every wait by this (tests compress an hour of retries)")
    args = parser.parse_args(argv)
    services = parse_services(args.service)
    routes, delivery = load_routes(args.manifests, services)
    router = Router(routes, delivery, time_scale=args.time_scale)
    sources = load_ping_sources(args.manifests, services)
    for source in sources:
        log(f"PingSource {source.name}: {source.schedule} -> {source.sink or 'the broker'}")
    threading.Thread(target=router.run_schedules, args=(sources,), daemon=True).start()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(router))
    server.daemon_threads = True
    for route in routes:
        filters = ", ".join(f"{k}={v}" for k, v in route.attributes.items()) or "every event"
        log(f"Trigger {route.trigger}: {filters} -> {route.subscriber} ({route.url})")
    log(f"listening on http://{args.host}:{server.server_address[1]}/ "
        f"({delivery.retry} retries, {delivery.backoff_policy} from {delivery.backoff_delay:g} s; "
        f"dead letters to {delivery.dead_letter})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
