"""No secret and no token in logs or metrics: a representative run (subscribe through the API,
list, dispatch with dead, transient and good devices, redelivery, Echo's request, clean-up) with
every log line captured, at DEBUG, as the JSON lines the functions write and as pytest records,
and every metric sample scraped; none may hold a device token, a Web Push endpoint or key, the
users' access tokens, the VAPID private key, the APNs .p8 key or the service account's private
key, nor the credentials the dispatchers obtained: FCM's OAuth access tokens and the APNs provider
tokens (JWTs)."""
from __future__ import annotations

import io
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator

import pytest

from shared import logs
from shared.subscriptions import SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.metrics_scrape import scrape


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], str]]:
    """Every log line, as the functions write it and as pytest records it, with logging set up
    the way production sets it up at ``PUSH_LOG_LEVEL=debug``. ``configure_logging`` runs once
    per process, so it is run afresh here: otherwise the level and the loggers it quiets would be
    whatever an earlier test left. Afterwards every logger is put back as it was."""
    root = logging.getLogger()
    levels = {lg: lg.level for lg in all_loggers()}
    handlers = list(root.handlers)
    stream = io.StringIO()
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logs, "_configured", False)
    monkeypatch.setenv("PUSH_LOG_LEVEL", "debug")
    logs.configure_logging()
    added = [handler for handler in root.handlers if handler not in handlers]
    yield lambda: stream.getvalue() + "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''} {vars(r)!r}" for r in caplog.records
    )
    for handler in added:
        root.removeHandler(handler)
    for lg in all_loggers():
        lg.setLevel(levels.get(lg, logging.NOTSET))


def all_loggers() -> list[logging.Logger]:
    manager = logging.Logger.manager
    return [logging.getLogger(), *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]


def pem_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM: what would show if the key leaked, escaped or not."""
    return [line.strip() for line in pem.splitlines() if len(line.strip()) >= 16 and "-----" not in line]


def secrets_of(rig, tmp_path) -> dict[str, str]:
    if rig.provider == "fcm":
        account = json.loads(open(os.environ["PUSH_FCM_CREDENTIALS"]).read())
        return {f"service-account key line {i}": line for i, line in enumerate(pem_lines(account["private_key"]))}
    if rig.provider == "apns":
        return {f"APNs .p8 line {i}": line for i, line in enumerate(pem_lines(rig.fake.key_pem))}
    return {"VAPID private key": os.environ["PUSH_VAPID_PRIVATE_KEY"]}


def credentials_obtained(rig) -> dict[str, str]:
    """What the dispatcher authenticated to its provider with during the run: the OAuth access
    tokens the fake FCM issued, the provider tokens (JWTs) the fake APNs accepted."""
    if rig.provider == "fcm":
        # The fake keeps the access tokens it issued only privately.
        return {f"FCM access token {i}": t for i, t in enumerate(sorted(rig.fake._access_tokens))}
    if rig.provider == "apns":
        return {f"APNs provider token {i}": t for i, t in enumerate(rig.fake.provider_tokens)}
    return {}


def device_body(rig) -> tuple[dict, list[str]]:
    """A subscribe body for the rig's provider, and the strings in it that must never leak."""
    if rig.provider == "fcm":
        body = bodies.fcm()
        return body, [body["token"]]
    if rig.provider == "apns":
        body = bodies.apns()
        return body, [body["token"]]
    subscription = rig.fake.subscribe()
    keys = subscription["keys"]
    return ({"provider": "webpush", "subscription": subscription},
            [subscription["endpoint"], keys["p256dh"], keys["auth"]])


async def test_logs_and_metrics_hold_no_token_endpoint_or_key(
    rig, function_client, engine, auth_env, tmp_path, captured
):
    subscribe, unsubscribe = function_client("subscribe"), function_client("unsubscribe")
    dispatch, cleanup = function_client(rig.function), function_client("cleanup-invalid-tokens")
    user = "user-" + secrets.token_hex(6)
    access_tokens = [auth_env.token(user), auth_env.token("other-" + secrets.token_hex(6))]
    watched: dict[str, str] = {f"access token {i}": t for i, t in enumerate(access_tokens)}
    watched["user id"] = user
    watched.update(secrets_of(rig, tmp_path))

    rows = []
    for i in range(3):
        body, private = device_body(rig)
        watched.update({f"device {i} secret {j}": value for j, value in enumerate(private)})
        response = await subscribe.post("/", json=body, headers={"Authorization": f"Bearer {access_tokens[0]}"})
        assert response.status_code == 201
    assert (await subscribe.get("/", headers={"Authorization": f"Bearer {access_tokens[0]}"})).status_code == 200
    # A refused subscribe and a refused unsubscribe, with the token in them.
    bad = {**body, "extra": private[0]}
    assert (await subscribe.post("/", json=bad, headers={"Authorization": f"Bearer {access_tokens[1]}"})).status_code == 400
    assert (await subscribe.post("/", json=body, headers={"Authorization": f"Bearer {access_tokens[0]}x"})).status_code == 401

    store = SubscriptionStore(engine)
    rows = store.for_users([user], rig.provider)
    dead, transient, fine = rows
    rig.dead(dead)
    rig.transient_once(transient)
    posted = events.notification([user], id_="secrets-1")
    assert (await dispatch.post("/", **posted)).status_code == 503
    reply = await dispatch.post("/", **posted)
    assert reply.status_code == 200
    headers = {k: v for k, v in reply.headers.items() if k.startswith("ce-") or k == "content-type"}
    assert (await cleanup.post("/", content=reply.content, headers=headers)).status_code == 202
    assert (await cleanup.post("/", **events.ping())).status_code == 202
    if rig.provider in ("fcm", "apns"):
        echo = {"deviceTokens": [fine.token, dead.token], "messageType": "checkEchoV1", "topic": bodies.TOPIC}
        assert (await dispatch.post(f"/v1/message/{rig.provider}", json=echo)).status_code == 200
    if rig.provider == "webpush":
        endpoint = json.loads(fine.token)["endpoint"]
        request = {"provider": "webpush", "endpoint": endpoint}
    else:
        request = {"provider": rig.provider, "token": fine.token}
    assert (await unsubscribe.post("/", json=request, headers={"Authorization": f"Bearer {access_tokens[1]}"})).status_code == 404
    assert (await unsubscribe.post("/", json=request, headers={"Authorization": f"Bearer {access_tokens[0]}"})).status_code == 200

    obtained = credentials_obtained(rig)
    assert len(obtained) > 0 or rig.provider == "webpush"
    watched.update(obtained)
    logged = captured()
    assert len(logged) > 0
    samples = scrape()
    metric_text = "\n".join(f"{name} {dict(labels)} {value}" for (name, labels), value in samples.items())
    leaks = sorted(
        (what, where) for what, value in watched.items()
        for where, text in (("logs", logged), ("metrics", metric_text)) if value in text
    )
    assert leaks == []
