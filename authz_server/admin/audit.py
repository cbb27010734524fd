"""The console's audit pages: the live events (the newest records, the page reloading itself
every few seconds with no script); the newest records filtered by actor, action, subject and result
(each a case-insensitive substring), a page at a time going back; the chain's verification; the
filtered records as a JSON download.

A page looks at :data:`WINDOW` records at most, from the newest (or from ``before``) back, and
shows the first :data:`SHOWN` that match: one indexed range read, however long the log. "Older"
goes on from where that window ended. The whole log as JSON stays ``oscar-as audit --json``;
the verification is :meth:`~authz_server.store.Store.verify_audit`, as ``oscar-as audit
--verify`` runs it (it reads the whole chain in a worker thread).

What it does not do: prune (``oscar-as audit prune`` and the AS's retention do).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..cli.common import AUDIT_FIELDS, pick
from ..store import AuditRecord
from .app import CONSOLE, html_response, session_of
from .html import esc, link, page, state, table, when

__all__ = ["SHOWN", "WINDOW", "add_routes"]

#: Records one page (or one export) looks at, at most.
WINDOW = 5000
#: Matching records one page shows, at most.
SHOWN = 200
_FILTERS = ("actor", "action", "subject", "result")


def _filters(request: web.Request) -> dict[str, str]:
    return {name: request.query.get(name, "")[:100] for name in _FILTERS}


def _before(request: web.Request) -> int | None:
    text = request.query.get("before", "")
    return int(text) if text.isdigit() and len(text) < 19 else None


async def _matching(
    request: web.Request, limit: int
) -> tuple[list[AuditRecord], int | None, dict[str, str]]:
    """The records of the window that match the filters (at most ``limit``), and where the
    next window starts (None: the log's beginning was reached)."""
    filters = _filters(request)
    wanted = {k: v.lower() for k, v in filters.items() if v}
    window = await request.app[CONSOLE].store.recent_audit(_before(request), WINDOW)
    matched = []
    last_seen = None
    for record in window:
        last_seen = record.seq
        fields = {
            "actor": record.actor,
            "action": record.action,
            "subject": record.subject,
            "result": record.result,
        }
        if all(v in fields[k].lower() for k, v in wanted.items()):
            matched.append(record)
            if len(matched) >= limit:
                break
    more = len(matched) >= limit or len(window) == WINDOW  # the window did not reach seq 1
    older = last_seen - 1 if more and last_seen is not None and last_seen > 1 else None
    return matched, older, filters


async def audit_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    matched, older, filters = await _matching(request, SHOWN)
    verified = ""
    if request.query.get("verify") == "1":
        intact, summary = await console.store.verify_audit()
        verified = (
            f'<div class="flash {"ok" if intact else "error"}" role="status">'
            f"Audit chain {'intact' if intact else 'BROKEN'}: {esc(summary)}</div>"
        )
    inputs = "".join(
        f'<label>{esc(name.capitalize())} contains<input name="{name}" value="{esc(value)}" '
        'maxlength="100"></label>'
        for name, value in filters.items()
    )
    search = (
        f'<form class="panel" method="get" action="/audit">{inputs}'
        '<button type="submit" class="quiet">Filter</button></form>'
    )
    rows = [
        [
            esc(r.seq),
            when(r.at),
            esc(r.actor),
            esc(r.action),
            esc(r.subject),
            state(r.result),
            f'<span class="mono">{esc(json.dumps(r.detail, sort_keys=True))}</span>',
        ]
        for r in matched
    ]
    kept = {k: v for k, v in filters.items() if v}
    if _before(request) is not None:
        kept_export = {**kept, "before": str(_before(request))}
    else:
        kept_export = kept
    tools = (
        "<p>"
        + link("/audit", "Verify the chain", verify="1", **kept)
        + " · "
        + link("/audit/export", "Export these as JSON", **kept_export)
        + (" · " + link("/audit", "Older", before=older, **kept) if older else "")
        + "</p>"
    )
    body = (
        verified
        + search
        + tools
        + table(
            ("seq", "at", "actor", "action", "subject", "result", "detail"),
            rows,
            "no record matches",
        )
    )
    return html_response(page("Audit", body, session, "/audit"))


async def export(request: web.Request) -> web.Response:
    session = session_of(request)
    matched, _, _ = await _matching(request, WINDOW)
    records: list[dict[str, Any]] = [pick(r, AUDIT_FIELDS) for r in matched]
    await request.app[CONSOLE].store.audit(
        session.actor,
        "audit-export",
        "audit",
        "ok",
        {"records": len(records)},
        request.app[CONSOLE].wall(),
    )
    return web.Response(
        text=json.dumps(records, indent=2) + "\n",
        content_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="oscar-audit.json"'},
    )


#: Seconds between two reloads of the live events page.
LIVE_REFRESH = 5
#: Records the live events page shows.
LIVE_SHOWN = 50


async def events_page(request: web.Request) -> web.Response:
    """The newest records as they come: the page reloads itself (a meta refresh, no script)."""
    console = request.app[CONSOLE]
    session = session_of(request)
    records = await console.store.recent_audit(limit=LIVE_SHOWN)
    rows = [
        [esc(r.seq), when(r.at), esc(r.actor), esc(r.action), esc(r.subject), state(r.result)]
        for r in records
    ]
    body = (
        f'<p class="muted">The newest {LIVE_SHOWN} audit records, reloaded every '
        f"{LIVE_REFRESH} s.</p>"
        + table(("seq", "at", "actor", "action", "subject", "result"), rows, "no record yet")
    )
    return html_response(page("Live events", body, session, "/events", refresh=LIVE_REFRESH))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/events", events_page)
    app.router.add_get("/audit", audit_page)
    app.router.add_get("/audit/export", export)
