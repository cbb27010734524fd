"""The admin console's HTML: the page layout, tables, forms and the style sheet; every value
escaped.

Rules every page keeps: text from the store or the request enters a page only through
:func:`esc` (``html.escape`` with quotes, so also safe inside attribute values), or through the
helpers here that call it (:func:`cell`, :func:`table`, :func:`hidden`, :func:`link`); no page
has a script or an inline style (the Content-Security-Policy of :mod:`.app` forbids both: a
style sheet from the console itself only); every form that changes something is a POST that
carries the session's CSRF token (:func:`form`). No page is given a secret to render: the
pages pick the fields they show by name (the CLI's allowlists, :mod:`authz_server.cli.common`).

What it does not do: decide anything or read the store (the views do).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

from .sessions import Session

__all__ = [
    "STYLE",
    "cell",
    "esc",
    "form",
    "hidden",
    "link",
    "page",
    "query",
    "state",
    "table",
    "when",
]

#: The console's one style sheet, served as ``/console.css``.
STYLE = """
:root { --fg: #1d2430; --muted: #5b6578; --line: #d9dee7; --accent: #1f5fbf; --bad: #b3261e;
        --ok: #1e7b34; --warn: #9a6700; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header { background: #18202c; color: #fff; padding: 0 24px; display: flex; align-items: center;
         gap: 24px; height: 48px; }
header .brand { font-weight: 600; letter-spacing: .02em; }
header nav a { color: #c9d3e3; text-decoration: none; margin-right: 16px; }
header nav a.here { color: #fff; border-bottom: 2px solid #7fb0ff; padding-bottom: 12px; }
header .who { margin-left: auto; color: #c9d3e3; display: flex; gap: 12px; align-items: center; }
header .who button { background: none; border: 1px solid #5d6b82; color: #fff; }
main { padding: 20px 24px; max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 16px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; word-break: break-all; }
th { background: #eef1f5; font-weight: 600; font-size: 12px; text-transform: uppercase;
     color: var(--muted); word-break: normal; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); padding: 12px 14px; }
.card .n { font-size: 24px; font-weight: 600; }
.card .l { color: var(--muted); font-size: 12px; }
form.inline { display: inline; }
form.panel { background: #fff; border: 1px solid var(--line); padding: 12px 14px;
             display: flex; gap: 10px; align-items: end; flex-wrap: wrap; margin-bottom: 12px; }
label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); gap: 2px; }
input, select { font: inherit; padding: 5px 8px; border: 1px solid #b8c0cc; }
button { font: inherit; padding: 5px 12px; border: 1px solid var(--accent);
         background: var(--accent); color: #fff; cursor: pointer; }
button.danger { background: var(--bad); border-color: var(--bad); }
button.quiet { background: #fff; color: var(--accent); }
.flash { padding: 8px 12px; margin-bottom: 12px; border: 1px solid var(--line); background: #fff; }
.flash.ok { border-color: var(--ok); color: var(--ok); }
.flash.error { border-color: var(--bad); color: var(--bad); }
.state { padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #e7ebf0;
         white-space: nowrap; }
.state-active, .state-healthy { background: #d7f0dd; color: var(--ok); }
.state-pre-active { background: #dde9fb; color: var(--accent); }
.state-deactivated { background: #eceff3; color: var(--muted); }
.state-compromised, .state-revoked, .state-denied, .state-not-responding {
    background: #fbe0de; color: var(--bad); }
.state-destroyed, .state-expired { background: #3a4150; color: #fff; }
.muted { color: var(--muted); }
.confirm { background: #fff; border: 2px solid var(--bad); padding: 16px; max-width: 640px; }
.confirm .name { font-family: ui-monospace, monospace; font-size: 16px; font-weight: 600; }
.login { max-width: 420px; margin: 80px auto; background: #fff; border: 1px solid var(--line);
         padding: 24px; }
.login input { width: 100%; }
code, .mono { font-family: ui-monospace, monospace; font-size: 13px; }
"""


def esc(value: object) -> str:
    """Text as HTML text or attribute value (``& < > " '`` escaped)."""
    return html.escape("" if value is None else str(value), quote=True)


def when(moment: object) -> str:
    """An integer Unix time as escaped ISO 8601 UTC; anything else as ``-``."""
    if not isinstance(moment, int) or isinstance(moment, bool):
        return "-"
    try:
        stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return esc(moment)
    return stamp.strftime("%Y-%m-%d %H:%M:%SZ")


def state(name: object) -> str:
    """A state badge: the class is chosen from a fixed list, the text escaped."""
    known = ("active", "pre-active", "deactivated", "compromised", "destroyed", "revoked",
             "expired", "denied")  # fmt: skip
    css = f" state-{name}" if name in known else ""
    return f'<span class="state{css}">{esc(name)}</span>'


def cell(value: object) -> str:
    return f"<td>{esc(value)}</td>"


def query(**values: object) -> str:
    """A URL's query string of ``values`` (URL-encoded; escape it with :func:`esc` in HTML)."""
    return urlencode({k: str(v) for k, v in values.items()})


def link(href: str, text: object, **values: object) -> str:
    """A link to a console path (fixed by the caller) with escaped, URL-encoded query values."""
    target = href + ("?" + query(**values) if values else "")
    return f'<a href="{esc(target)}">{esc(text)}</a>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    """A table; ``rows`` hold HTML made by the helpers here (already escaped)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(header)}" class="muted">{esc(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hidden(name: str, value: object) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def form(
    session: Session,
    action: str,
    inner: str,
    button: str,
    *,
    css: str = "inline",
    danger: bool = False,
) -> str:
    """A POST form to ``action`` (a console path) with the session's CSRF token."""
    kind = ' class="danger"' if danger else ""
    return (
        f'<form class="{esc(css)}" method="post" action="{esc(action)}">'
        f'{hidden("csrf", session.csrf)}{inner}<button type="submit"{kind}>{esc(button)}</button>'
        "</form>"
    )


_NAV = (
    ("/", "Overview"),
    ("/devices", "Devices"),
    ("/grants", "Grants"),
    ("/resources", "Resources"),
    ("/audit", "Audit"),
    ("/events", "Live events"),
)


_HERE = ' class="here"'


def page(
    title: str, body: str, session: Session | None, here: str = "", *, refresh: int = 0
) -> str:
    """A whole page: the header (navigation, who is logged in, logout) and the flashes;
    reloaded by the browser every ``refresh`` seconds if given (no script needed)."""
    top = '<span class="brand">OSCAR AS console</span>'
    if session is not None:
        links = "".join(
            f'<a href="{path}"{_HERE if path == here else ""}>{esc(name)}</a>'
            for path, name in _NAV
        )
        logout = form(session, "/logout", "", "Log out")
        top += f'<nav>{links}</nav><span class="who">{esc(session.admin)} {logout}</span>'
        flashes = "".join(
            f'<div class="flash {esc(kind)}" role="status">{esc(text)}</div>'
            for kind, text in session.take_flashes()
        )
    else:
        flashes = ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        + (f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh > 0 else "")
        + f'<title>{esc(title)} · OSCAR AS</title><link rel="stylesheet" href="/console.css">'
        f"</head><body><header>{top}</header><main>{flashes}<h1>{esc(title)}</h1>{body}"
        "</main></body></html>"
    )
