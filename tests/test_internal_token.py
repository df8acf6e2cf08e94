"""The internal functions' shared secret (PUSH_INTERNAL_TOKEN; on OpenFaaS the secret
push-internal-token): once configured, the dispatchers and clean-up serve only requests carrying
it in X-Push-Internal-Token, refuse the others with 401 and a JSON error, and send it themselves
where they post to an internal function. Platform probes and the public functions never need it."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.models import DeadLetter
from tests import events

TOKEN = "a-long-random-shared-secret-0123456789"
WITH_TOKEN = {"X-Push-Internal-Token": TOKEN}


@pytest.fixture
def internal_token(monkeypatch):
    monkeypatch.setenv("PUSH_INTERNAL_TOKEN", TOKEN)
    return TOKEN


def with_headers(request: dict, extra: dict[str, str]) -> dict:
    return {**request, "headers": {**request["headers"], **extra}}


async def test_a_dispatcher_refuses_an_event_without_the_secret(webpush_rig, function_client, engine, internal_token):
    device = webpush_rig.add(engine, "7")
    response = await function_client("dispatch-webpush").post("/", **events.notification(["7"]))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert webpush_rig.wakeups(device) == []


async def test_a_dispatcher_refuses_a_wrong_secret(webpush_rig, function_client, engine, internal_token):
    device = webpush_rig.add(engine, "7")
    request = with_headers(events.notification(["7"]), {"X-Push-Internal-Token": TOKEN[:-1] + "x"})
    assert (await function_client("dispatch-webpush").post("/", **request)).status_code == 401
    assert webpush_rig.wakeups(device) == []


async def test_a_dispatcher_serves_an_event_with_the_secret(webpush_rig, function_client, engine, internal_token):
    device = webpush_rig.add(engine, "7")
    request = with_headers(events.notification(["7"]), WITH_TOKEN)
    assert (await function_client("dispatch-webpush").post("/", **request)).status_code == 202
    assert webpush_rig.wakeups(device) == ["checkEchoV1"]


@pytest.mark.parametrize("provider", ["fcm", "apns"])
async def test_echos_path_needs_the_secret_too(provider, request, tmp_path, monkeypatch, function_client, engine,
                                               internal_token):
    from tests.rigs import RIGS

    rig_class, fixture = RIGS[provider]
    rig = rig_class(request.getfixturevalue(fixture), tmp_path)
    rig.configure(monkeypatch)
    dispatch = function_client(rig.function)
    echo = {"deviceTokens": ["ab" * 32], "messageType": "checkEchoV1", "topic": "org.example.app", "dryRun": True}
    assert (await dispatch.post(f"/v1/message/{provider}", json=echo)).status_code == 401
    assert (await dispatch.post(f"/v1/message/{provider}", json=echo, headers=WITH_TOKEN)).status_code == 200


async def test_cleanup_refuses_a_dead_letter_without_the_secret_and_keeps_one_with_it(
    function_client, engine, internal_token
):
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    cleanup = function_client("cleanup-invalid-tokens")
    letter = events.binary(events.cloud_event("org.wikimedia.push.notification.requested.v1", {"users": ["7"]}))
    assert (await cleanup.post("/dead-letters", **letter)).status_code == 401
    assert (await cleanup.post("/", **events.ping())).status_code == 401
    assert (await cleanup.post("/dead-letters", **with_headers(letter, WITH_TOKEN))).status_code == 202
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


@pytest.mark.parametrize("path", ["/_/health", "/_/ready", "/healthz", "/readyz"])
async def test_probes_need_no_secret(function_client, engine, internal_token, path):
    assert (await function_client("cleanup-invalid-tokens").get(path)).status_code == 200


async def test_the_secret_is_read_from_the_mounted_secret_file(function_client, engine, tmp_path, monkeypatch):
    """As OpenFaaS mounts it: /var/openfaas/secrets/push-internal-token (PUSH_SECRETS_DIR)."""
    monkeypatch.delenv("PUSH_INTERNAL_TOKEN", raising=False)
    (tmp_path / "push-internal-token").write_text(TOKEN + "\n")
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path))
    cleanup = function_client("cleanup-invalid-tokens")
    assert (await cleanup.post("/", **events.ping())).status_code == 401
    assert (await cleanup.post("/", **with_headers(events.ping(), WITH_TOKEN))).status_code == 202


async def test_without_a_configured_secret_internal_functions_take_any_request(function_client, engine, monkeypatch):
    monkeypatch.delenv("PUSH_INTERNAL_TOKEN", raising=False)
    assert (await function_client("cleanup-invalid-tokens").post("/", **events.ping())).status_code == 202


async def test_the_public_functions_never_ask_for_it(function_client, engine, auth_env, internal_token):
    response = await function_client("subscribe").get(
        "/", headers={"Authorization": f"Bearer {auth_env.token('7')}"})
    assert response.status_code == 200


async def test_a_dispatchers_dead_token_report_carries_the_secret(
    webpush_rig, function_client, engine, sink, monkeypatch, internal_token
):
    monkeypatch.setenv("K_SINK", sink.url)
    dead = webpush_rig.add(engine, "7")
    webpush_rig.dead(dead)
    request = with_headers(events.notification(["7"]), WITH_TOKEN)
    assert (await function_client("dispatch-webpush").post("/", **request)).status_code == 202
    [(headers, _data)] = sink.events
    assert headers["x-push-internal-token"] == TOKEN


def test_the_deployed_cleanup_answers_401_without_the_secret_and_serves_it_with(tmp_path, monkeypatch):
    """clean-up started by the image's own command line (the Dockerfile's CMD, gunicorn and its
    uvicorn worker), the secret given as OpenFaaS gives it: a file in PUSH_SECRETS_DIR."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from shared.cli import main as pushctl
    from tests.conftest import REPO
    from tests.test_images import DOCKERFILE, dockerfile_instructions, image_command

    url = f"sqlite:///{tmp_path / 'push.sqlite3'}"
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    assert pushctl(["migrate"]) == 0
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "push-internal-token").write_text(TOKEN)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = image_command(dockerfile_instructions(DOCKERFILE.read_text())).replace("/app/functions/", f"{REPO}/functions/")
    environment = {
        **{k: v for k, v in os.environ.items() if k != "PUSH_INTERNAL_TOKEN"},
        "FUNCTION": "cleanup-invalid-tokens", "PORT": str(port), "PUSH_DATABASE_URL": url,
        "PUSH_SECRETS_DIR": str(secrets), "PUSH_METRICS_PORT": "off",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(["sh", "-c", command], env=environment, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=ping["content"], method="POST",
                                         headers={**ping["headers"], **headers})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    ping = events.ping()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_/health", timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "clean-up did not start"
                time.sleep(0.1)
        status, body = post({})
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        assert post(WITH_TOKEN)[0] == 202
    finally:
        server.terminate()
        server.wait(timeout=20)
