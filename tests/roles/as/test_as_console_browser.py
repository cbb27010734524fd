"""The admin console in a real browser: Debian's headless Chromium driven by Playwright, against
one real AS process (``oscar-as serve --admin``) for the whole module.

Flows: login, every page, enrolment with its bundle downloadable once (and the device then
connecting to the AS with it over DTLS), a grant through its preview and its revocation, a
device's revocation, rotate / compromise / destroy behind their confirmations, the audit page
(filter, verify, export); refusals: a form posted from another origin, a POST without the CSRF
token, script injected through every free-text field (and through a name in the audit log), a
logged-out user, an expired or revoked token.

Chromium is Debian's (``/usr/bin/chromium``, ``make deps``); Playwright's own browser download
is never used. The console's certificate is ignored by the browser here (it is issued by the
test's AS CA); tests/roles/as/test_as_console.py checks it against that CA. With
``OSCAR_CONSOLE_SCREENSHOTS=DIR`` the tests save a screenshot of each page in DIR (how
docs/console-*.png are made).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from as_harness import AsProcess, Client, make_state
from playwright import sync_api as playwright_api

from authz_server.store import Resource, Store
from demo.system import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TEMP, HUMID = "sensor-1/temperature", "sensor-1/humidity"
#: Under the 64 characters a denial's subject keeps (store/denials.py).
PAYLOAD = '<img src=x onerror="window.__pwned=1"><script>alert(2)</script>'
SHOTS = os.environ.get("OSCAR_CONSOLE_SCREENSHOTS")


def in_thread(work: Any) -> Any:
    """Run a coroutine to its end in a thread of its own: sync Playwright keeps an event loop
    running in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


class Env:
    def __init__(self, state: Path, server: AsProcess, base: str, tokens: dict[str, str]) -> None:
        self.state = state
        self.server = server
        self.base = base
        self.tokens = tokens

    def store_call(self, work: Any) -> Any:
        async def run() -> Any:
            store = await Store.open(self.state)
            try:
                return await work(store)
            finally:
                await store.close()

        return in_thread(run())

    def audit(self) -> list[tuple[str, str, str]]:
        records = self.store_call(lambda s: s.audit_records())
        return [(r.actor, r.action, r.subject) for r in records]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("console")
    state = tmp / "state"
    now = int(time.time())

    async def setup() -> dict[str, str]:
        await make_state(state)
        store = await Store.open(state)
        try:
            for device, role in (
                ("sensor-1", "producer"), ("phone-1", "consumer"), ("phone-2", "consumer"),
                ("phone-3", "consumer"),
            ):  # fmt: skip
                await store.add_device(device, role, os.urandom(16), now)
            await store.register_resources(
                [Resource(r, "sensor-1", 50, "ccm-es256", 60, 3600, now) for r in (TEMP, HUMID)]
            )
            # A name a requester chose, as a refused request leaves it in the audit log.
            await store.audit_denial("phone-3", "secret", PAYLOAD, "not granted", now)
            tokens = {
                "alice": await store.issue_admin_token("alice", None, now),
                "bob": await store.issue_admin_token("bob", None, now),
                # Issued long ago, expired a minute ago.
                "old": await store.issue_admin_token("old", now - 60, now - 3600),
            }
        finally:
            await store.close()
        return tokens

    tokens = asyncio.run(setup())
    port = free_port()
    server = AsProcess(state, tmp / "as.log", "--admin", str(port))
    server.start()
    try:
        yield Env(state, server, f"https://127.0.0.1:{port}", tokens)
    finally:
        status = server.stop()
        log = server.log()
        assert status == 0 and "Traceback" not in log, log
        assert all(token not in log for token in tokens.values())


@pytest.fixture(scope="module")
def browser(env: Env) -> Iterator[Any]:
    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: make deps installs it"
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser: Any) -> Any:
    context = browser.new_context(ignore_https_errors=True, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(10_000)
    return page


def login(page: Any, env: Env, who: str = "alice") -> None:
    page.goto(env.base + "/login")
    page.fill("input[name=token]", env.tokens[who])
    page.click("button[type=submit]")
    page.wait_for_url(env.base + "/")


@pytest.fixture(scope="module")
def admin(browser: Any, env: Env) -> Iterator[Any]:
    """One logged-in browser context (alice) for the flows."""
    page = new_page(browser)
    login(page, env)
    yield page
    page.context.close()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"console-{name}.png"), full_page=True)


def not_pwned(page: Any) -> None:
    assert page.evaluate("() => window.__pwned") is None


def flash(page: Any) -> str:
    return page.inner_text(".flash")


# --- the flows -------------------------------------------------------------------------------


def test_login_shows_every_page_with_the_security_headers(browser: Any, env: Env) -> None:
    page = new_page(browser)
    try:
        page.goto(env.base + "/login")
        shot(page, "login")
        page.fill("input[name=token]", env.tokens["alice"])
        page.click("button[type=submit]")
        page.wait_for_url(env.base + "/")
        assert "alice" in page.inner_text("header")
        assert page.inner_text(".cards").count("active consumers") == 1
        # The one instance (SQLite), healthy: its heartbeat is written as it starts.
        main = page.inner_text("main")
        assert "AS instances (1 of 1 healthy)" in main and f"127.0.0.1:{env.server.port}" in main
        shot(page, "overview")
        cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-oscar-console")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        for path, title in (
            ("/devices", "Devices"), ("/grants", "Grants"), ("/resources", "Resources"),
            ("/audit", "Audit"), ("/resource?id=" + TEMP, "Resource " + TEMP),
            ("/events", "Live events"),
        ):  # fmt: skip
            response = page.goto(env.base + path)
            assert response.status == 200 and page.inner_text("h1") == title
            headers = response.headers
            assert "default-src 'none'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert headers["x-frame-options"] == "DENY"
            assert headers["cache-control"] == "no-store"
            assert headers["referrer-policy"] == "same-origin"
            assert "<script" not in page.content().lower()  # no script of ours anywhere
        records = env.audit()
        assert ("admin:alice", "login", "console") in records
    finally:
        page.context.close()


def test_enroll_hands_out_the_bundle_once_and_the_device_connects(admin: Any, env: Env) -> None:
    page = admin
    page.goto(env.base + "/devices")
    shot(page, "devices")
    page.fill("form[action='/devices/enroll'] input[name=id]", "meter-7")
    page.select_option("form[action='/devices/enroll'] select[name=role]", "consumer")
    page.click("form[action='/devices/enroll'] button")
    page.wait_for_url(re.compile(r".*/devices/enrolled\?d=.*"))
    assert "meter-7" in page.inner_text("main")
    shot(page, "enrolled")
    html_before = page.content()
    with page.expect_download() as info:
        page.click("a.download")
    bundle = json.loads(Path(info.value.path()).read_text())
    assert bundle["id"] == "meter-7" and bundle["role"] == "consumer"
    psk = bytes.fromhex(bundle["psk_hex"])
    assert bundle["psk_hex"] not in html_before
    # Once only: the same link again is gone.
    link = page.get_attribute("a.download", "href")
    response = page.goto(env.base + link)
    assert response.status == 410 and "downloaded already" in page.inner_text("main")
    for path in ("/devices", "/device?id=meter-7", "/", "/audit"):
        page.goto(env.base + path)
        assert bundle["psk_hex"] not in page.content()
    # The AS lets the new device in with the bundle's PSK.
    enrolled = [r for r in env.audit() if r[1] == "enroll" and r[2] == "meter-7"]
    assert enrolled == [("admin:alice", "enroll", "meter-7")]
    assert ("admin:alice", "bundle-download", "meter-7") in env.audit()

    async def fetch() -> str:
        deadline = time.monotonic() + 10
        while True:
            client = await Client.connect(env.server, "meter-7", psk)
            try:
                code, _ = await client.get("resources")
                return code
            except Exception:
                if time.monotonic() > deadline:
                    raise
            finally:
                await client.close()
            await asyncio.sleep(0.3)

    assert in_thread(fetch()) == "2.05"


def test_a_grant_through_its_preview_then_its_revocation(admin: Any, env: Env) -> None:
    page = admin
    page.goto(env.base + "/grants")
    page.select_option("select[name=consumer]", "phone-1")
    page.fill("input[name=pattern]", "sensor-1/*")
    page.click("form[action='/grants/preview'] button")
    page.wait_for_url(re.compile(r".*/grants/preview\?.*"))
    text = page.inner_text("main")
    assert TEMP in text and HUMID in text and "matches 2 live resource(s)" in text
    shot(page, "grant-preview")
    page.click("form[action='/grants/add'] button")
    page.wait_for_url(env.base + "/grants")
    assert "granted phone-1 sensor-1/*" in flash(page)
    row = page.locator("tr", has_text="phone-1").filter(has_text="sensor-1/*")
    assert "active" in row.inner_text()
    shot(page, "grants")
    grants = env.store_call(lambda s: s.grants("phone-1"))
    assert [(g[2], g[5]) for g in grants] == [("sensor-1/*", None)]
    row.locator("button", has_text="Revoke").click()
    page.wait_for_url(env.base + "/grants")
    assert "revoked phone-1's grant" in flash(page)
    grants = env.store_call(lambda s: s.grants("phone-1"))
    assert grants[0][5] is not None
    records = env.audit()
    assert ("admin:alice", "grant", "phone-1") in records
    assert ("admin:alice", "revoke-grant", "phone-1") in records


def test_a_device_is_revoked_behind_a_confirmation_naming_it(admin: Any, env: Env) -> None:
    page = admin
    page.goto(env.base + "/devices")
    page.locator("tr", has_text="phone-2").locator("a", has_text="revoke").click()
    page.wait_for_url(re.compile(r".*/device/revoke\?id=phone-2"))
    assert page.inner_text(".confirm .name") == "phone-2"
    assert env.store_call(lambda s: s.device("phone-2")).status == "active"  # nothing yet
    page.click(".confirm button")
    page.wait_for_url(env.base + "/devices")
    assert "revoked device phone-2" in flash(page)
    assert env.store_call(lambda s: s.device("phone-2")).status == "revoked"
    assert ("admin:alice", "revoke-device", "phone-2") in env.audit()


def test_rotate_compromise_and_destroy_behind_confirmations(admin: Any, env: Env) -> None:
    page = admin

    def states() -> list[tuple[int, str]]:
        return [(e.epoch, e.state) for e in env.store_call(lambda s: s.epochs(HUMID))]

    def active() -> int:
        return next(n for n, state in states() if state == "active")

    def do(action: str, label: str) -> None:
        page.goto(env.base + "/resource?id=" + HUMID)
        page.click(f"a:has-text('{label}…')")
        page.wait_for_url(re.compile(rf".*/resource/confirm\?.*action={action}.*"))
        assert page.inner_text(".confirm .name") == HUMID
        if action == "compromise":
            shot(page, "confirm")
        page.click(".confirm button")
        page.wait_for_url(re.compile(r".*/resource\?id=.*"))
        assert page.locator(".flash.ok").count() == 1, page.inner_text("main")

    first = active()
    do("rotate", "Rotate")
    assert dict(states())[first] == "deactivated" and active() == first + 1
    do("compromise", "Mark compromised")
    assert dict(states())[first + 1] == "compromised" and active() == first + 2
    retired = [n for n, state in states() if state in ("deactivated", "compromised")]
    do("destroy", "Destroy retired epochs")
    assert retired and all(dict(states())[n] == "destroyed" for n in retired)
    assert dict(states())[active()] == "active" and active() == first + 2
    shot(page, "resource")
    records = env.audit()
    for action in ("rotate", "compromise", "destroy"):
        assert ("admin:alice", action, HUMID) in records


def test_the_audit_page_filters_verifies_and_exports(admin: Any, env: Env) -> None:
    page = admin
    page.goto(env.base + "/audit")
    page.fill("input[name=actor]", "admin:alice")
    page.click("form[action='/audit'] button")
    page.wait_for_url(re.compile(r".*/audit\?.*actor=admin%3Aalice.*"))
    actors = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert actors and set(actors) == {"admin:alice"}
    page.click("a:has-text('Verify the chain')")
    page.wait_for_url(re.compile(r".*verify=1.*"))
    assert "Audit chain intact" in page.inner_text(".flash")
    shot(page, "audit")
    with page.expect_download() as info:
        page.click("a:has-text('Export these as JSON')")
    exported = json.loads(Path(info.value.path()).read_text())
    assert exported and {r["actor"] for r in exported} == {"admin:alice"}
    assert [r["seq"] for r in exported] == sorted((r["seq"] for r in exported), reverse=True)
    assert ("admin:alice", "audit-export", "audit") in env.audit()


def test_the_live_events_page_shows_a_new_record_by_itself(admin: Any, env: Env) -> None:
    page = admin
    page.goto(env.base + "/events")
    assert "ping-from-the-test" not in page.inner_text("main")
    env.store_call(
        lambda s: s.audit("tester", "ping-from-the-test", "events", "ok", {}, int(time.time()))
    )
    # No click, no script: the page reloads itself (every 5 s).
    page.wait_for_selector("td:has-text('ping-from-the-test')", timeout=15_000)
    shot(page, "events")


# --- refusals --------------------------------------------------------------------------------


def test_a_form_posted_from_another_origin_is_refused(admin: Any, env: Env) -> None:
    page = admin
    target = env.base + "/grants/add"
    evil = (
        f'<form method="post" action="{target}"><input name="consumer" value="phone-3">'
        '<input name="pattern" value="sensor-1/*"><input name="until" value="">'
        '<button id="go">win a prize</button></form>'
    ).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
        with page.expect_response(target) as info:
            page.click("#go")
        assert info.value.status == 403
        assert "another origin" in page.inner_text("body")
    finally:
        site.shutdown()
        site.server_close()
    # Same origin, the session's cookie, no CSRF token: refused as well.
    response = page.request.post(
        target,
        form={"consumer": "phone-3", "pattern": "sensor-1/*", "until": ""},
        headers={"Origin": env.base},
    )
    assert response.status == 403 and "CSRF" in response.text()
    assert env.store_call(lambda s: s.grants("phone-3")) == []


def test_script_injected_through_every_free_text_field_shows_as_text(admin: Any, env: Env) -> None:
    page = admin
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    # A name in the audit log, chosen by a requester (the setup's denial): on two pages.
    for path in ("/", "/audit?subject=script"):
        page.goto(env.base + path)
        assert PAYLOAD in page.inner_text("main")
        not_pwned(page)
    # Enrolment's device id: refused, nothing enrolled, nothing run.
    page.goto(env.base + "/devices")
    page.fill("form[action='/devices/enroll'] input[name=id]", PAYLOAD)
    page.click("form[action='/devices/enroll'] button")
    page.wait_for_url(env.base + "/devices")
    assert "a device id is" in flash(page)
    not_pwned(page)
    # The filters echo what was typed, as text.
    for path, field in (
        ("/devices", "q"), ("/resources", "q"), ("/audit", "actor"), ("/audit", "subject"),
    ):  # fmt: skip
        page.goto(env.base + path)
        page.fill(f"input[name={field}]", PAYLOAD)
        page.click(f"form[action='{path}'] button")
        page.wait_for_load_state()
        assert page.input_value(f"input[name={field}]") == PAYLOAD
        not_pwned(page)
    # A grant pattern: refused with one line, the grant not made.
    page.goto(env.base + "/grants")
    page.select_option("select[name=consumer]", "phone-3")
    page.fill("input[name=pattern]", "sensor-1/" + PAYLOAD)
    page.click("form[action='/grants/preview'] button")
    page.wait_for_url(env.base + "/grants")
    assert "a resource pattern is" in flash(page)
    not_pwned(page)
    # Ids in query strings come back in error messages, escaped.
    page.goto(env.base + "/device?id=" + PAYLOAD)
    assert "no device" in flash(page) and "<script>" in flash(page)
    not_pwned(page)
    assert dialogs == []
    assert env.store_call(lambda s: s.grants("phone-3")) == []
    assert all("<" not in d.id for d in env.store_call(lambda s: s.devices()))


def test_a_logged_out_user_is_sent_to_login(browser: Any, env: Env) -> None:
    page = new_page(browser)
    try:
        for path in ("/", "/devices", "/audit/export", "/devices/bundle?d=x"):
            page.goto(env.base + path)
            assert page.url == env.base + "/login"
        login(page, env, "bob")
        cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-oscar-console")
        page.click("header form[action='/logout'] button")
        page.wait_for_url(env.base + "/login")
        page.goto(env.base + "/devices")
        assert page.url == env.base + "/login"
        # The old session's cookie, put back: ended for good.
        page.context.add_cookies([cookie])
        page.goto(env.base + "/devices")
        assert page.url == env.base + "/login"
        assert ("admin:bob", "logout", "console") in env.audit()
    finally:
        page.context.close()


def test_an_expired_or_revoked_token_cannot_log_in_and_revocation_ends_a_session(
    browser: Any, env: Env
) -> None:
    page = new_page(browser)
    try:
        page.goto(env.base + "/login")
        page.fill("input[name=token]", env.tokens["old"])
        page.click("button[type=submit]")
        assert page.url == env.base + "/login"
        assert "not valid" in page.inner_text(".flash")
        # bob logs in, then his token is revoked (the CLI's way): his session ends at once.
        login(page, env, "bob")
        env.store_call(lambda s: s.revoke_admin_token("bob", int(time.time())))
        page.goto(env.base + "/devices")
        assert page.url == env.base + "/login"
        page.fill("input[name=token]", env.tokens["bob"])
        page.click("button[type=submit]")
        assert "not valid" in page.inner_text(".flash")
        denied = [r for r in env.store_call(lambda s: s.audit_records()) if r.action == "login"]
        assert any(r.actor == "console" and r.result == "denied" for r in denied)
    finally:
        page.context.close()
