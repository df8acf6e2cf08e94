"""The subscription API against its OpenAPI description (openapi/subscriptions.yaml), with
schemathesis generating valid and invalid requests for every operation, on both databases.

Every answer must be one the description names, with the headers and body it describes; none may
be a 5xx; data that breaks the description must be refused; and a refused request (4xx) must leave
the subscriptions table exactly as it was.
"""
from __future__ import annotations

import warnings

import pytest
import schemathesis
from functions_framework.aio import create_asgi_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

with warnings.catch_warnings():  # "use httpx2": schemathesis itself runs ASGI apps this way
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from shared.db import get_engine
from shared.models import Subscription
from shared.vapid import generate_vapid_keys
from tests import subscription_bodies as bodies
from tests.conftest import REPO

SCHEMA = REPO / "openapi" / "subscriptions.yaml"
BASE_URL = "http://testserver/function"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Cases per run and database; the whole file stays well under a minute.
MAX_EXAMPLES = 150

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Gateway:
    """Routes /function/<name>/... to that function's ASGI app at /..., as OpenFaaS does."""

    def __init__(self, apps: dict[str, object]) -> None:
        self.apps = apps

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        for prefix, app in self.apps.items():
            path = scope["path"]
            if path == prefix or path.startswith(prefix + "/"):
                inner = path[len(prefix):] or "/"
                await app({**scope, "path": inner, "raw_path": inner.encode()}, receive, send)
                return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def load_function(name: str):
    return create_asgi_app(target=name, source=str(REPO / "functions" / name / "main.py"))


def snapshot(engine) -> list[tuple]:
    with Session(engine) as session:
        return [
            (r.id, r.user_id, r.provider, r.token, r.token_sha256, r.topic, r.environment, r.updated_at)
            for r in session.scalars(select(Subscription).order_by(Subscription.id))
        ]


def load_schema():
    config = SchemathesisConfig.from_dict({
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 413, 415, 429, 431]}}
    })
    return schemathesis.openapi.from_path(SCHEMA, config=config)


def test_the_description_is_a_valid_openapi_document_naming_every_operation():
    schema = load_schema()
    operations = sorted(
        (op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()
    )
    assert operations == [
        ("DELETE", "/unsubscribe"), ("GET", "/subscribe"), ("GET", "/subscribe/vapid-public-key"),
        ("OPTIONS", "/subscribe"), ("OPTIONS", "/unsubscribe"), ("POST", "/subscribe"), ("POST", "/unsubscribe"),
    ]


def test_generated_requests_get_described_answers_and_refusals_write_nothing(
    database_url, auth_env, monkeypatch
):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "1000000/minute")  # the limit has a test of its own
    monkeypatch.setenv("PUSH_CORS_ALLOWED_ORIGINS", "https://en.wikipedia.org")
    monkeypatch.setenv("PUSH_VAPID_PUBLIC_KEY", generate_vapid_keys().public_key)
    engine = get_engine(database_url)
    gateway = Gateway({"/function/subscribe": load_function("subscribe"),
                       "/function/unsubscribe": load_function("unsubscribe")})
    schema = load_schema()
    strategies = [
        operation.ok().as_strategy(generation_mode=mode)
        for operation in schema.get_all_operations()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    users = ["alice", "bob"]
    headers = {user: auth_env.headers(user) for user in users}
    seen: dict[int, int] = {}

    with TestClient(gateway, raise_server_exceptions=True) as client:
        # A few real devices, so unsubscribe and refreshes also meet rows that exist.
        for body in (bodies.fcm(), bodies.apns(), bodies.webpush()):
            assert client.post(f"{BASE_URL}/subscribe", json=body, headers=headers["alice"]).status_code == 201

        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=st.one_of(strategies), user=st.sampled_from(users))
        def check(case, user):
            before = snapshot(engine)
            sent_headers = headers[user]
            kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=sent_headers)
            response = client.request(**kwargs)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS, headers=sent_headers)
            if 400 <= response.status_code < 500:
                assert snapshot(engine) == before, f"a refused request ({response.status_code}) wrote rows"

        check()
    # The run exercised acceptance and refusal both.
    assert any(200 <= status < 300 for status in seen), seen
    assert seen.get(400, 0) > 0, seen
