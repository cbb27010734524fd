"""The admin console's HTTP side: the aiohttp application on the AS's event loop, its security
rules in one place, login and logout.

Every response carries: a Content-Security-Policy that allows nothing but the console's own
style sheet, images and forms (``default-src 'none'; style-src 'self'; img-src 'self';
form-action 'self'; frame-ancestors 'none'; base-uri 'none'``: no script runs, inline or not),
``X-Frame-Options: DENY``, ``Cache-Control: no-store``, ``Referrer-Policy: same-origin`` (no
address of the console leaves it; ``no-referrer`` would make browsers send ``Origin: null``),
``X-Content-Type-Options: nosniff`` and HSTS.

Every request, before any view:

- its ``Host`` must be one the console was bound as (the address, and ``localhost`` beside a
  loopback one): a DNS-rebound name gets 421;
- a POST must come with an ``Origin`` of the console itself (else 403: a form posted from
  another site), and, but for the login, the session's CSRF token (else 403);
- but for the login page and the style sheet, it needs a live session (else a redirect to
  ``/login``): the session cookie names one (:mod:`.sessions`) that is neither idle too long nor
  too old, and its admin's token is still live in the store (a revocation or expiry ends the
  session at the next request, on every instance).

A database that cannot answer makes any request a 503 (the session cannot be checked: closed).

Login takes a token of ``oscar-as admin-token``: at most ``login_burst`` attempts per source
address, then one per ``60 / login_per_minute`` seconds (429 beyond). A success starts a session
(audited ``login`` under ``admin:NAME``); a failure is a tallied denial (actor ``console``,
subject the source address) and says nothing about why.

What it does not do: render pages (:mod:`.html`, the views), or check tokens (the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from oscar_io.errors import UsageError

from ..ratelimit import RateLimit
from ..store import DatabaseError, Store, StoreError
from .html import STYLE, esc, page
from .sessions import Session, SessionPolicy, Sessions

__all__ = [
    "CONSOLE",
    "COOKIE",
    "SESSION",
    "ConsoleState",
    "attempt",
    "html_response",
    "make_app",
    "session_of",
]

log = logging.getLogger("oscar.as")

#: The session cookie: ``__Host-`` makes the browser refuse it unless Secure, Path=/, no Domain.
COOKIE = "__Host-oscar-console"

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    # Not no-referrer: under it browsers send "Origin: null" with a form's POST, and the
    # Origin check below would refuse the console's own forms.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConsoleState:
    """What the views share: the store, the sessions, the login limit, the clocks."""

    store: Store
    hosts: frozenset[str]  # "host:port" values the Host header may have
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    login_burst: int = 10
    login_per_minute: float = 10.0
    wall: Callable[[], int] = lambda: int(time.time())
    mono: Callable[[], float] = time.monotonic
    sessions: Sessions = field(init=False)
    logins: RateLimit = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.policy)
        self.logins = RateLimit(self.login_per_minute / 60.0, self.login_burst)

    def origins(self) -> frozenset[str]:
        return frozenset(f"https://{host}" for host in self.hosts)


CONSOLE = web.AppKey("console", ConsoleState)
#: The request's session, set by the middleware for every view but the login's (a typed key
#: where aiohttp has them, 3.13 on: it warns about a plain one).
SESSION: Any = web.RequestKey("session", Session) if hasattr(web, "RequestKey") else "oscar.session"

_OPEN = frozenset({"/login", "/console.css"})


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


async def attempt(session: Session, work: Awaitable[str]) -> bool:
    """Run an admin action: its message flashed as done, or the store's refusal (or bad input,
    ValueError) flashed as an error, the state unchanged. Whether it was done."""
    try:
        message = await work
    except DatabaseError:
        raise  # a 503 (the guard), not a refusal of the action
    except (StoreError, UsageError, ValueError) as exc:
        session.flash("error", str(exc))
        return False
    session.flash("ok", message)
    return True


def session_of(request: web.Request) -> Session:
    session = request.get(SESSION)
    if not isinstance(session, Session):  # the middleware lets no view run without one
        raise web.HTTPForbidden()
    return session


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers[name] = value


def _refused(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The rules of the module docstring, before any view; a database that cannot answer (the
    session check's read included) is a 503, failing closed."""
    try:
        return await _guarded(request, handler)
    except DatabaseError as exc:
        log.warning("console: %s %s: %s", request.method, request.path, exc)
        return _refused(503, "the AS database is unavailable; try again")


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[CONSOLE]
    if request.host not in state.hosts:
        return _refused(421, "this console answers to its own address only")
    if request.method not in ("GET", "HEAD", "POST"):
        return _refused(405, "method not allowed")
    if request.method == "POST" and request.headers.get("Origin") not in state.origins():
        return _refused(403, "refused: a form from another origin")
    if request.path in _OPEN:
        return await handler(request)
    session = state.sessions.get(request.cookies.get(COOKIE), state.mono())
    if session is not None:
        admin = await state.store.admin(session.admin)
        if (
            admin is None
            or admin.status(state.wall()) != "active"
            or (admin.created_at != session.token_issued)
        ):
            state.sessions.end(session)
            session = None
    if session is None:
        if request.method == "POST":
            return _refused(403, "refused: no session (log in again)")
        raise web.HTTPSeeOther("/login")
    if request.method == "POST":
        form = await request.post()
        if not session.csrf_ok(form.get("csrf")):
            return _refused(403, "refused: the form's CSRF token is missing or wrong")
    request[SESSION] = session
    return await handler(request)


async def style(request: web.Request) -> web.Response:
    return web.Response(text=STYLE, content_type="text/css")


def _login_page(message: str = "") -> str:
    note = f'<div class="flash error" role="alert">{esc(message)}</div>' if message else ""
    body = (
        f'<div class="login">{note}<form method="post" action="/login">'
        '<label>Admin token<input type="password" name="token" autocomplete="off" '
        'autofocus required></label><p><button type="submit">Log in</button></p></form>'
        '<p class="muted">Tokens come from <code>oscar-as admin-token --name NAME</code>.</p>'
        "</div>"
    )
    return page("Log in", body, None)


async def login_form(request: web.Request) -> web.Response:
    return web.Response(text=_login_page(), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    state = request.app[CONSOLE]
    source = request.remote or "unknown"
    wait = state.logins.take(source, state.mono())
    if len(state.logins) > 10_000:
        state.logins.prune(state.mono())
    if wait > 0:
        return web.Response(
            status=429,
            text=_login_page(f"Too many attempts: try again in {int(wait) + 1} s."),
            content_type="text/html",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    form = await request.post()
    token = form.get("token")
    now = state.wall()
    admin = await state.store.admin_of_token(token, now) if isinstance(token, str) else None
    if admin is None:
        await state.store.audit_denial("console", "login", source, "bad admin token", now)
        return web.Response(
            status=401, text=_login_page("That token is not valid."), content_type="text/html"
        )
    earlier = state.sessions.get(request.cookies.get(COOKIE), state.mono())
    if earlier is not None:  # a login replaces the browser's session: a new id, a new token
        state.sessions.end(earlier)
    session = state.sessions.start(admin.name, admin.created_at, state.mono())
    await state.store.audit(session.actor, "login", "console", "ok", {"from": source}, now)
    log.info("console: %s logged in from %s", admin.name, source)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, session.id, path="/", secure=True, httponly=True, samesite="Strict")
    raise response


async def logout(request: web.Request) -> web.Response:
    state = request.app[CONSOLE]
    session = session_of(request)
    state.sessions.end(session)
    await state.store.audit(session.actor, "logout", "console", "ok", {}, state.wall())
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    raise response


def make_app(state: ConsoleState, routes: Callable[[web.Application], None]) -> web.Application:
    """The console's application: the guard, login and logout, and the views ``routes`` adds."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[CONSOLE] = state
    app.on_response_prepare.append(_headers)
    app.router.add_get("/console.css", style)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    routes(app)
    return app
