"""The console's grants page: every grant with its status, revocation, and a new grant through a
preview of the live resources its pattern matches now (a GET that changes nothing), confirmed by
a POST.

Each action calls the store method the admin CLI calls (``add_grant``, ``revoke_grants``), with
the actor ``admin:NAME``; patterns and times are checked as the CLI checks them
(:func:`authz_server.cli.common.resource_pattern`, :func:`~authz_server.cli.common.time_arg`).

What it does not do: devices, resources or the audit log (the other views).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from aiohttp import web

from oscar.names import is_device_id
from oscar_io.errors import UsageError

from ..cli.common import resource_pattern, time_arg
from ..store import Conflict
from .app import CONSOLE, attempt, html_response, session_of
from .html import esc, form, hidden, link, page, state, table, when

__all__ = ["add_routes"]

#: Resources a preview lists at most (it counts them all).
PREVIEW_LISTED = 200
_LOCAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?")


def until_arg(text: str, now: int) -> int | None:
    """The grant's end: empty for none; Unix seconds or ISO 8601 (UTC when no offset)."""
    text = text.strip()
    if not text:
        return None
    if _LOCAL.fullmatch(text):
        text += "Z"
    return time_arg(text, now, "until")


async def grants_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    now = console.wall()
    rows = []
    for grant_id, consumer, pattern, until, granted, revoked in await console.store.grants(None):
        status = (
            "revoked"
            if revoked
            else "expired"
            if until is not None and until <= now
            else ("active")
        )
        action = ""
        if status == "active":
            action = form(
                session,
                "/grants/revoke",
                hidden("consumer", consumer) + hidden("pattern", pattern),
                "Revoke",
                danger=True,
            )
        rows.append(
            [
                esc(grant_id),
                link("/device", consumer, id=consumer),
                f"<code>{esc(pattern)}</code>",
                when(until),
                when(granted),
                state(status),
                action,
            ]
        )
    consumers = sorted(
        d.id for d in await console.store.devices() if d.role == "consumer" and d.status == "active"
    )
    options = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in consumers)
    add = (
        '<form class="panel" method="get" action="/grants/preview">'
        f'<label>Consumer<select name="consumer" required>{options}</select></label>'
        '<label>Resource pattern<input name="pattern" required maxlength="255" '
        'placeholder="sensor-1/*"></label>'
        '<label>Until (UTC, empty: no end)<input name="until" maxlength="40" '
        'placeholder="2030-01-01T00:00:00Z"></label>'
        '<button type="submit">Preview</button></form>'
    )
    body = (
        "<h2>Grant a consumer resources</h2>"
        + add
        + "<h2>Grants</h2>"
        + table(("id", "consumer", "pattern", "until", "granted", "status", ""), rows)
    )
    return html_response(page("Grants", body, session, "/grants"))


async def preview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    consumer = request.query.get("consumer", "")
    pattern_text = request.query.get("pattern", "")
    until_text = request.query.get("until", "")
    try:
        if not is_device_id(consumer):
            raise UsageError(f"no consumer {consumer!r}")
        pattern = resource_pattern(pattern_text)
        until = until_arg(until_text, console.wall())
    except UsageError as exc:
        session.flash("error", str(exc))
        raise web.HTTPSeeOther("/grants") from None
    matched = [
        (r, epoch)
        for r, epoch in await console.store.live_resources()
        if fnmatchcase(r.id, pattern)
    ]
    rows = [
        [link("/resource", r.id, id=r.id), esc(r.producer_id), esc(epoch)]
        for r, epoch in matched[:PREVIEW_LISTED]
    ]
    more = len(matched) - PREVIEW_LISTED
    confirm = form(
        session,
        "/grants/add",
        hidden("consumer", consumer) + hidden("pattern", pattern) + hidden("until", until_text),
        "Grant",
        css="panel",
    )
    body = (
        f"<p>Grant <strong>{esc(consumer)}</strong> the resources matching "
        f"<code>{esc(pattern)}</code> until <strong>{when(until) if until else 'revoked'}"
        f"</strong>. It matches <strong>{len(matched)}</strong> live resource(s) now "
        "(and any registered later that match):</p>"
        + table(("resource", "producer", "active epoch"), rows, "no live resource matches now")
        + (f'<p class="muted">and {more} more</p>' if more > 0 else "")
        + confirm
        + '<p><a href="/grants">Cancel</a></p>'
    )
    return html_response(page("Preview a grant", body, session, "/grants"))


async def add(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    data = await request.post()
    consumer = str(data.get("consumer", ""))

    async def work() -> str:
        if not is_device_id(consumer):
            raise Conflict(f"{consumer!r} is not an active consumer")
        pattern = resource_pattern(str(data.get("pattern", "")))
        now = console.wall()
        until = until_arg(str(data.get("until", "")), now)
        rotated = await console.store.add_grant(consumer, pattern, until, now, actor=session.actor)
        return f"granted {consumer} {pattern}" + (
            f"; rotated: {', '.join(rotated)}" if rotated else ""
        )

    await attempt(session, work())
    raise web.HTTPSeeOther("/grants")


async def revoke(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    data = await request.post()
    consumer, pattern = str(data.get("consumer", "")), str(data.get("pattern", ""))

    async def work() -> str:
        if not is_device_id(consumer):
            raise Conflict(f"{consumer!r} is not a consumer")
        rotated = await console.store.revoke_grants(
            consumer, pattern, console.wall(), actor=session.actor
        )
        return f"revoked {consumer}'s grant on {pattern}; rotated: {', '.join(rotated) or 'none'}"

    await attempt(session, work())
    raise web.HTTPSeeOther("/grants")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/grants", grants_page)
    app.router.add_get("/grants/preview", preview)
    app.router.add_post("/grants/add", add)
    app.router.add_post("/grants/revoke", revoke)
