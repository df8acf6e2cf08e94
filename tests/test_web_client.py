"""The reference web client (examples/web/) in a real browser: headless Chromium driven by
selenium, against subscribe and unsubscribe served over HTTP as deployed, on both databases.

The page is served from one origin and the functions each from another (another port), so every
call the page makes crosses origins: Chromium sends the real preflight and enforces the answer.
This machine's Chromium has no push service to reach, so the page subscribes with a subscription
it makes itself (a real P-256 key pair and auth secret, an endpoint on a stand-in push service);
a push is then delivered to its service worker with the DevTools protocol
(``ServiceWorker.deliverPushMessage``), carrying the bytes dispatch-webpush encrypts for a
wake-up, and the worker must fetch the notifications from a stand-in wiki API and show one.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (``make tools``
installs them as root). Without them the tests are skipped locally, and fail with ``CI=true``.
"""
from __future__ import annotations

import asyncio
import functools
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest
import websocket
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from fakes.wiki import FakeWikiApi
from shared.core import Device, WakeUp
from shared.db import get_engine
from shared.endpoints import EndpointRules
from shared.models import Subscription
from shared.providers.webpush import WebPushProvider
from shared.vapid import generate_vapid_keys
from tests.conftest import IN_CI, REPO, empty_tables, fresh_database
from tests.deployed import deployed_all, free_port

#: Under pytest-xdist these run on one worker: the module's functions and browser start once.
pytestmark = pytest.mark.xdist_group("web_client")

WEB_CLIENT = REPO / "examples" / "web"
#: Without these the browser tries to reach Google's hosts (sign-in, components, field trials,
#: QUIC probes), which on a closed network only slows every start.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
#: Generous: a loaded two-core machine starts a browser and two functions slowly.
WAIT_SECONDS = 60
KEYS = generate_vapid_keys()
TALK_PAGE_MESSAGE = {
    "wiki": "testwiki", "id": 4711, "type": "edit-user-talk", "category": "edit-user-talk",
    "timestamp": {"utciso8601": "2026-12-05T00:00:00Z"},
    "*": {
        "header": "<strong>Alice</strong> left a message on your talk page &quot;Hello&quot;",
        "compactHeader": "Alice left a message",
        "body": "Welcome to the wiki!",
        "iconUrl": None,
        "links": {"primary": {"url": "http://127.0.0.1:1/wiki/User_talk:Bob", "label": "View message"}},
    },
}
OLDER_MENTION = {**TALK_PAGE_MESSAGE, "id": 4710, "type": "mention"}


def chromium_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = (
        "Chromium is not installed: the web client's browser tests need Debian's chromium and "
        "chromium-driver (`make tools` installs them when run as root)"
    )
    if IN_CI:
        pytest.fail(message + " (CI=true: they must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def chromium() -> tuple[str, str]:
    """Chromium's and its driver's paths; checked first, so a run without them starts nothing."""
    return chromium_paths()


#: The stand-in push service the page makes its subscriptions on (nothing is pushed there: a push
#: reaches the worker through DevTools). Subscribe accepts endpoints on it as a local receiver,
#: as `make run` lets its own through (PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS).
STANDIN = "localhost:8090"


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """examples/web/ served as files, as `make run` serves it: the page's own origin."""
    handler = functools.partial(_QuietFiles, directory=str(WEB_CLIENT))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def wiki() -> Iterator[FakeWikiApi]:
    with FakeWikiApi([TALK_PAGE_MESSAGE, OLDER_MENTION]) as api:
        yield api


@dataclass
class Functions:
    subscribe: str
    unsubscribe: str
    metrics: dict[str, int]

    def requests_counted(self, function: str, method: str, status_class: str) -> float:
        """``push_requests_total`` of one function, method and status class, from its metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[function]}/metrics", timeout=5).read().decode()
        wanted = f'push_requests_total{{function="{function}",method="{method}",status_class="{status_class}"}} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


@contextmanager
def start_functions(allowed_origin: str, database_url: str, auth_public_key: str) -> Iterator[Functions]:
    metrics = {"subscribe": free_port(), "unsubscribe": free_port()}
    settings = {
        "PUSH_DATABASE_URL": database_url,
        "PUSH_AUTH_PUBLIC_KEY": auth_public_key,
        "PUSH_CORS_ALLOWED_ORIGINS": allowed_origin,
        "PUSH_VAPID_PUBLIC_KEY": KEYS.public_key,
        "PUSH_METRICS_ADDR": "127.0.0.1",
        "PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS": STANDIN,
    }
    with deployed_all({name: {"PUSH_METRICS_PORT": str(port), **settings} for name, port in metrics.items()}) as ports:
        yield Functions(f"http://127.0.0.1:{ports['subscribe']}", f"http://127.0.0.1:{ports['unsubscribe']}", metrics)


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def served(request, tmp_path_factory, issuer, page_origin) -> Iterator[tuple[Functions, str]]:
    """subscribe and unsubscribe, each on its own origin allowing the page's, on a database of
    each engine: started once for the module (a start is seconds of imports)."""
    url = fresh_database(request.param, tmp_path_factory.mktemp(request.param))
    with start_functions(page_origin, url, issuer.public_pem) as functions:
        yield functions, url


@pytest.fixture
def database_url(served) -> str:
    """This module's database (conftest's, on each engine, is made per test), emptied."""
    empty_tables(served[1])
    return served[1]


@pytest.fixture
def functions(served, database_url) -> Functions:
    return served[0]


@pytest.fixture
def browser(chromium, tmp_path) -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


class Page:
    """The web client's page in the browser, used as a person would: fields and buttons."""

    def __init__(self, driver: webdriver.Chrome, origin: str, functions: Functions, standin: str, wiki_api: str):
        self.driver = driver
        self.origin = origin
        query = urlencode({
            "subscribe": functions.subscribe, "unsubscribe": functions.unsubscribe, "wiki": wiki_api,
            "standin": standin, "timeout": "0.3",
        })
        driver.get(f"{origin}/?{query}")
        driver.execute_cdp_cmd("Browser.grantPermissions", {"origin": origin, "permissions": ["notifications"]})

    def sign_in(self, token: str) -> None:
        self.driver.find_element(By.ID, "token").send_keys(token)

    def click(self, button: str) -> tuple[str, str]:
        """Click a button and wait for its outcome: ``("ok" or "error", the status text)``."""
        status = self.driver.find_element(By.ID, "status")
        self.driver.execute_script("arguments[0].dataset.action = ''", status)
        self.driver.find_element(By.ID, button).click()
        WebDriverWait(self.driver, WAIT_SECONDS).until(
            lambda _: status.get_attribute("data-action") == button and status.get_attribute("data-outcome") != "busy"
        )
        return status.get_attribute("data-outcome"), status.text

    def stored_subscription(self) -> dict:
        return json.loads(self.driver.execute_script("return localStorage.getItem('push-functions.subscription')"))

    def listed(self) -> list[list[str]]:
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#subscriptions tr")
        return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]

    def shown_on_push(self) -> list[dict]:
        """The notifications the service worker reports the browser holds after its last push
        (it reads them back with ``registration.getNotifications()`` right after showing, and
        posts them to the page). Read there rather than from the page afterwards: headless
        Chromium closes a shown notification by itself (after about 24 s on this machine), and a
        loaded run that asked from the page once found none."""
        status = self.driver.find_element(By.ID, "status")
        WebDriverWait(self.driver, WAIT_SECONDS).until(lambda _: status.get_attribute("data-action") == "push")
        return json.loads(self.driver.find_element(By.ID, "last-notification").text)


@pytest.fixture
def page(browser, page_origin, functions, wiki, issuer) -> Page:
    page = Page(browser, page_origin, functions, f"https://{STANDIN}", wiki.api_url)
    page.sign_in(issuer.token("alice"))
    return page


def rows(database_url: str) -> list[Subscription]:
    with get_engine(database_url).connect() as connection:
        return list(connection.execute(select(Subscription.__table__)))


class DevTools:
    """A second DevTools client of the page (selenium's only sends commands; this one also reads
    events): the service worker's registration id comes as an event."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        address = driver.capabilities["goog:chromeOptions"]["debuggerAddress"]
        targets = json.load(urllib.request.urlopen(f"http://{address}/json/list", timeout=5))
        page = next(t for t in targets if t["type"] == "page" and t["url"].startswith("http"))
        # No Origin header: Chromium refuses DevTools connections from web origins it was not told of.
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=WAIT_SECONDS, suppress_origin=True)
        self.next_id = 0

    def command(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def registration_id(self, scope: str) -> str:
        """The id of the service-worker registration for ``scope``, from the events that
        ``ServiceWorker.enable`` sends."""
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": "ServiceWorker.enable"}))
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("method") == "ServiceWorker.workerRegistrationUpdated":
                for registration in message["params"]["registrations"]:
                    if registration["scopeURL"] == scope and not registration["isDeleted"]:
                        return registration["registrationId"]
        raise AssertionError(f"no service worker registered for {scope}")

    def close(self) -> None:
        self.socket.close()


def wake_up_as_dispatched(webpush_server) -> str:
    """The plaintext dispatch-webpush sends for a wake-up, as a push service's browser decrypts
    it: the real provider pushes to the fake push service, which decrypts."""
    subscription = webpush_server.subscribe(KEYS.public_key)

    async def push() -> None:
        provider = WebPushProvider(
            vapid_private_key=KEYS.private_key, vapid_subject="mailto:push@example.org", ca_file=webpush_server.ca_file,
            endpoint_rules=EndpointRules(local_endpoints=frozenset({("localhost", webpush_server.port)})),
        )
        try:
            await provider.send(Device(id=1, token=json.dumps(subscription)), WakeUp("checkEchoV1", 60))
        finally:
            await provider.aclose()

    asyncio.run(push())
    (received,) = webpush_server.pushes_to(subscription)
    return received.payload.decode()


def test_a_page_on_another_origin_subscribes_through_the_preflight(page, functions, database_url):
    preflights = functions.requests_counted("subscribe", "OPTIONS", "2xx")
    posts = functions.requests_counted("subscribe", "POST", "2xx")
    outcome, text = page.click("subscribe")
    assert outcome == "ok", text
    assert KEYS.public_key in text  # the key the page discovered and subscribed with
    (row,) = rows(database_url)
    stored = page.stored_subscription()
    assert (row.user_id, row.provider) == ("alice", "webpush")
    assert json.loads(row.token)["endpoint"] == stored["endpoint"]
    assert json.loads(row.token)["keys"] == stored["keys"]
    # The browser asked first (OPTIONS), then sent the request the answer allowed.
    assert functions.requests_counted("subscribe", "OPTIONS", "2xx") > preflights
    assert functions.requests_counted("subscribe", "POST", "2xx") == posts + 1


def test_the_page_lists_the_users_devices_and_marks_its_own(page, database_url):
    assert page.click("subscribe")[0] == "ok"
    outcome, text = page.click("list")
    assert (outcome, text) == ("ok", "1 device(s) subscribed.")
    ((listed_id, provider, _app, _updated, mark),) = page.listed()
    (row,) = rows(database_url)
    assert (listed_id, provider, mark) == (str(row.id), "webpush", "this browser")


def test_the_page_unsubscribes_its_browser(page, functions, database_url):
    assert page.click("subscribe")[0] == "ok"
    preflights = functions.requests_counted("unsubscribe", "OPTIONS", "2xx")
    outcome, text = page.click("unsubscribe")
    assert (outcome, text) == ("ok", "Unsubscribed (1 removed).")
    assert rows(database_url) == []
    assert functions.requests_counted("unsubscribe", "OPTIONS", "2xx") > preflights


#: For the tests that check what the browser does, not what is stored: one database is enough.
SQLITE_ONLY = pytest.mark.parametrize("served", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_the_page_reads_a_refusal_across_origins(page, database_url):
    """Errors carry the CORS headers too: the page shows the function's own reason."""
    page.driver.find_element(By.ID, "token").clear()
    page.sign_in("not-a-token")
    outcome, text = page.click("list")
    assert (outcome, text) == ("error", "401 invalid_token: the access token is not valid")


@SQLITE_ONLY
def test_a_page_on_an_origin_not_allowed_is_blocked_by_the_browser(
    browser, page_origin, database_url, issuer, wiki
):
    with start_functions("https://en.wikipedia.org", database_url, issuer.public_pem) as functions:
        page = Page(browser, page_origin, functions, f"https://{STANDIN}", wiki.api_url)
        page.sign_in(issuer.token("alice"))
        outcome, text = page.click("subscribe")
        assert outcome == "error"
        assert text == "Failed to fetch"  # the browser withholds the answer from the page
        assert rows(database_url) == []
        assert functions.requests_counted("subscribe", "POST", "2xx") == 0


@SQLITE_ONLY
def test_a_push_wakes_the_service_worker_which_shows_the_wikis_notification(page, webpush_server, wiki):
    assert page.click("subscribe")[0] == "ok"
    payload = wake_up_as_dispatched(webpush_server)
    assert json.loads(payload) == {"type": "checkEchoV1"}
    devtools = DevTools(page.driver)
    try:
        registration = devtools.registration_id(page.origin + "/")
        devtools.command(
            "ServiceWorker.deliverPushMessage", origin=page.origin, registrationId=registration, data=payload
        )
    finally:
        devtools.close()
    try:
        (shown,) = page.shown_on_push()
    except TimeoutException:
        status = page.driver.find_element(By.ID, "status").text
        raise AssertionError(f"no notification shown; the page says {status!r}; the wiki saw {wiki.requests}") from None
    assert shown == {
        "title": 'Alice left a message on your talk page "Hello"',
        "body": "Welcome to the wiki!\n+1 more unread",
        "tag": "wiki-notifications",
        "data": {"url": "http://127.0.0.1:1/wiki/User_talk:Bob", "id": 4711},
    }
    (query,) = wiki.requests
    assert query == {
        "action": "query", "meta": "notifications", "notprop": "list|count", "notfilter": "!read",
        "notformat": "model", "notlimit": "1", "format": "json", "formatversion": "2", "origin": page.origin,
    }
