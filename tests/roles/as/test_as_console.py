"""The admin console without a browser: in this process, on a real store (SQLite, then
PostgreSQL: ``backing``), over real TLS (aiohttp's client): the certificate chains to the AS CA
and names the bound address; the Host, Origin, CSRF and session rules; the login rate limit;
sessions' idle and absolute expiry and the one-time bundle (pure state, a pinned clock);
``--admin`` parsing, and ``oscar-as serve --admin`` refusing an address it cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from pg_harness import Backing, PgCluster

from authz_server.admin import ConsoleUnavailable, check_console_address, start_console
from authz_server.admin.sessions import SessionPolicy, Sessions
from authz_server.ca import CertificateAuthority, init_state
from authz_server.cli.common import UsageError
from authz_server.cli.serve import admin_arg
from authz_server.store import Store
from demo.system import free_port

NOW = 1_900_000_000


class Env:
    def __init__(self, store: Store, base: str, ca_pem: Path, token: str, state: Path) -> None:
        self.store = store
        self.base = base
        self.ca_pem = ca_pem
        self.token = token
        self.state = state

    def client(self, *, verify: bool = True) -> aiohttp.ClientSession:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # it takes no cookie of an IP else
        )


@contextlib.asynccontextmanager
async def console_on(state: Path, database: str | None) -> AsyncIterator[Env]:
    import time

    now = int(time.time())
    store = await init_state(state, as_uri="coaps://127.0.0.1", now=now, database=database)
    token = await store.issue_admin_token("alice", None, now)
    ca = await CertificateAuthority.load(store)
    console = await start_console(store, ca, "127.0.0.1", 0, now)
    try:
        yield Env(store, console.url.rstrip("/"), state / "ca.pem", token, state)
    finally:
        await console.close()
        await store.close()


@pytest_asyncio.fixture
async def env(backing: Backing) -> AsyncIterator[Env]:
    async with console_on(backing.state, backing.database) as started:
        yield started


async def login(client: aiohttp.ClientSession, env: Env, token: str | None = None) -> int:
    async with client.post(
        env.base + "/login",
        data={"token": token or env.token},
        headers={"Origin": env.base},
        allow_redirects=False,
    ) as response:
        return response.status


@pytest.mark.asyncio
async def test_the_certificate_chains_to_the_as_ca_and_names_the_address(env: Env) -> None:
    context = ssl.create_default_context(cafile=str(env.ca_pem))  # checks the name too
    host, port = env.base.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    async with env.client() as client, client.get(env.base + "/login") as response:
        assert response.status == 200
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    cert = x509.load_der_x509_certificate(der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(env.ca_pem.read_bytes())
    assert cert.issuer == ca.subject
    # Its key is nowhere on disk: the state directory holds what init made, nothing more.
    made = {p.name for p in env.state.iterdir() if not p.name.startswith("as.db")}
    assert made - {"database.url"} == {"ca.pem", "master.key"}


@pytest.mark.asyncio
async def test_host_origin_csrf_and_session_rules(env: Env) -> None:
    async with env.client(verify=False) as client:
        # A rebound name: 421.
        async with client.get(env.base + "/login", headers={"Host": "evil.example"}) as r:
            assert r.status == 421
        # No session: to the login page; a POST: 403.
        async with client.get(env.base + "/devices", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        # A login from another origin, or with none: refused before the token is looked at.
        for origin in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
            async with client.post(
                env.base + "/login", data={"token": env.token}, headers=origin,
                allow_redirects=False,
            ) as r:  # fmt: skip
                assert r.status == 403
        assert await login(client, env, "oscar-admin-wrong") == 401
        assert await login(client, env) == 303
        async with client.get(env.base + "/devices") as r:
            assert r.status == 200
            page = await r.text()
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        form = {"id": "meter-1", "role": "consumer"}
        for headers, data, status in (
            ({"Origin": env.base}, form, 403),  # no CSRF token
            ({"Origin": env.base}, {**form, "csrf": csrf[:-1] + "x"}, 403),  # a wrong one
            ({}, {**form, "csrf": csrf}, 403),  # no Origin
            ({"Origin": env.base}, {**form, "csrf": csrf}, 303),  # all right
        ):
            async with client.post(
                env.base + "/devices/enroll", data=data, headers=headers, allow_redirects=False
            ) as r:
                assert r.status == status, (headers, data)
        assert [d.id for d in await env.store.devices()] == ["meter-1"]
        # PUT and friends: 405.
        async with client.put(env.base + "/devices", headers={"Origin": env.base}) as r:
            assert r.status == 405


@pytest.mark.asyncio
async def test_logins_are_rate_limited_per_source(env: Env) -> None:
    async with env.client(verify=False) as client:
        statuses = [await login(client, env, "oscar-admin-guess") for _ in range(12)]
        assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
        assert await login(client, env) == 429  # even the right token, for now
    records = await env.store.audit_records()
    await env.store.flush_denials(drain=True)
    records = await env.store.audit_records()
    denied = [r for r in records if r.action == "login" and r.result == "denied"]
    assert denied and denied[0].actor == "console" and denied[0].subject == "127.0.0.1"
    assert all(env.token not in str(r.detail) for r in records)


def test_sessions_expire_when_idle_or_old_and_bundles_go_once() -> None:
    sessions = Sessions(SessionPolicy(idle=10, absolute=30, max_sessions=2))
    s = sessions.start("alice", NOW, 0.0)
    assert sessions.get(s.id, 9.0) is s and sessions.get(s.id, 18.0) is s  # each use restarts
    assert sessions.get(s.id, 28.5) is None and sessions.get(s.id, 1.0) is None  # idle: gone
    s = sessions.start("alice", NOW, 100.0)
    for t in (109.0, 118.0, 127.0):
        assert sessions.get(s.id, t) is s
    assert sessions.get(s.id, 130.0) is None  # 30 s after login, however busy
    first, second, third = (sessions.start("x", NOW, 200.0) for _ in range(3))
    assert sessions.get(first.id, 201.0) is None and len(sessions) == 2  # the oldest went
    key = second.keep_bundle("meter-1", b"{psk}", 300.0)
    assert second.take_bundle(key, 301.0) == ("meter-1", b"{psk}")
    assert second.take_bundle(key, 302.0) is None
    late = second.keep_bundle("meter-2", b"{psk}", 300.0)
    assert second.take_bundle(late, 300.0 + 601) is None
    assert "psk" not in repr(second) and second.id not in repr(second)
    assert second.csrf_ok(second.csrf) and not second.csrf_ok(third.csrf)
    assert not second.csrf_ok(None)


def test_the_admin_flag_binds_loopback_unless_a_host_is_named() -> None:
    assert admin_arg(None) is None
    assert admin_arg("8443") == ("127.0.0.1", 8443)
    assert admin_arg(8443) == ("127.0.0.1", 8443)
    assert admin_arg("192.0.2.7:8443") == ("192.0.2.7", 8443)
    assert admin_arg("[::1]:8443") == ("::1", 8443)
    for bad in ("0.0.0.0:8443", "[::]:8443", "99999", "host", "a:b"):
        with pytest.raises(UsageError):
            admin_arg(bad)
    with pytest.raises(ConsoleUnavailable):
        check_console_address("0.0.0.0", 8443)  # noqa: S104 (refused, the point)


def test_the_toml_file_may_turn_the_console_on(tmp_path: Path) -> None:
    from authz_server.cli import build_parser
    from authz_server.cli.serve import apply_serve_config

    config = tmp_path / "as.toml"
    for value, expected in (("8443", ("127.0.0.1", 8443)), ('"[::1]:9443"', ("::1", 9443))):
        config.write_text(f'state = "s"\nlisten = "127.0.0.1:5684"\nadmin = {value}\n')
        args = build_parser().parse_args(["serve", "--config", str(config)])
        apply_serve_config(args)
        assert admin_arg(args.admin) == expected
    # The flag wins over the file.
    args = build_parser().parse_args(["serve", "--config", str(config), "--admin", "7443"])
    apply_serve_config(args)
    assert admin_arg(args.admin) == ("127.0.0.1", 7443)
    config.write_text('state = "s"\nlisten = "127.0.0.1:5684"\nadmin = true\n')
    args = build_parser().parse_args(["serve", "--config", str(config)])
    with pytest.raises(UsageError):
        apply_serve_config(args)


def test_serve_refuses_an_admin_address_it_cannot_serve(tmp_path: Path) -> None:
    from authz_server.cli import main

    state = tmp_path / "state"
    assert main(["init", "--state", str(state)]) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for admin, code, says in (
            (str(busy), 1, f"--admin 127.0.0.1:{busy}"),
            ("0.0.0.0:8443", 2, "not the any-address"),
        ):
            run = subprocess.run(
                [sys.executable, "-m", "authz_server", "serve", "--state", str(state),
                 "--listen", f"127.0.0.1:{free_port()}", "--admin", admin],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert run.returncode == code, run.stderr
            assert run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
            assert run.stderr.startswith("oscar-as serve: error: ")


@pytest.mark.asyncio
async def test_a_database_that_cannot_answer_is_a_503_then_the_console_goes_on(
    tmp_path: Path,
) -> None:
    cluster = await asyncio.to_thread(PgCluster.start)  # its own: this test stops it
    try:
        database = await asyncio.to_thread(cluster.new_database)
        async with (
            console_on(tmp_path / "state", database) as env,
            env.client(verify=False) as client,
        ):
            assert await login(client, env) == 303
            async with client.get(env.base + "/devices") as r:
                assert r.status == 200
            await asyncio.to_thread(cluster.halt)  # an operator stops PostgreSQL
            for path in ("/devices", "/"):
                async with client.get(env.base + path, allow_redirects=False) as r:
                    assert r.status == 503 and "unavailable" in await r.text()  # closed
            await asyncio.to_thread(cluster.resume)
            deadline = asyncio.get_running_loop().time() + 20
            while True:  # the backend connects again after its backoff; the session lives on
                async with client.get(env.base + "/devices", allow_redirects=False) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
    finally:
        cluster.stop()
