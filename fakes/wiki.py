"""A stand-in for a wiki's Action API, as much of it as a woken web client reads:
``action=query&meta=notifications`` (Echo's module), answered for one user with the
notifications the test gives, in the ``notformat=model`` shape Echo gives them.

Cross-origin requests are answered as MediaWiki answers them: only when the request names its
origin in the ``origin`` parameter and that is the ``Origin`` header (else 403), with
``Access-Control-Allow-Origin`` set to it and credentials allowed, because the wiki knows the
user by their session cookie.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class FakeWikiApi:
    """Serves ``/w/api.php`` on 127.0.0.1; :attr:`requests` records each query's parameters."""

    def __init__(self, notifications: list[Mapping[str, Any]]) -> None:
        self.notifications = notifications
        self.requests: list[dict[str, str]] = []
        wiki = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                query = {name: values[-1] for name, values in parse_qs(url.query).items()}
                wiki.requests.append(query)
                origin = self.headers.get("Origin")
                if url.path != "/w/api.php":
                    return self._answer(404, {"error": "no such path"})
                if origin is not None and query.get("origin") != origin:
                    return self._answer(403, {"error": {"code": "mismatchingorigin"}})
                return self._answer(200, wiki.answer(query), origin)

            def _answer(self, status: int, body: object, origin: str | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                if origin is not None:
                    self.send_header("Access-Control-Allow-Origin", origin)
                    self.send_header("Access-Control-Allow-Credentials", "true")
                    self.send_header("Vary", "Origin")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/w/api.php"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, query: Mapping[str, str]) -> dict[str, Any]:
        if query.get("action") != "query" or query.get("meta") != "notifications":
            return {"error": {"code": "badvalue", "info": "only action=query&meta=notifications here"}}
        unread = [n for n in self.notifications if query.get("notfilter") != "!read" or not n.get("read")]
        limit = int(query.get("notlimit", "20"))
        props = query.get("notprop", "list").split("|")
        found: dict[str, Any] = {}
        if "list" in props:
            found["list"] = unread[:limit]
        if "count" in props:
            found["count"], found["rawcount"] = str(len(unread)), len(unread)
        return {"batchcomplete": True, "query": {"notifications": found}}

    def __enter__(self) -> FakeWikiApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
