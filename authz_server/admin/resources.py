"""The console's resources pages: every resource with its epochs in runs, one resource's timeline
of epochs with their KMIP-style states, and rotate, compromise and destroy, each behind a
confirmation page that names the resource.

Each action calls the store method the admin CLI calls (``rotate``, ``compromise``; destroy is
:meth:`~authz_server.store.keyring.Keyring.destroy_retired`, the retired epochs of the one
resource named, now), with the actor ``admin:NAME``. No secret is read: the epochs' fields are
picked by name.

What it does not do: devices, grants or the audit log (the other views).
"""

from __future__ import annotations

from aiohttp import web

from oscar.names import is_resource_id

from ..cli.common import epoch_runs
from ..store import NoSuchRecord, Resource
from .app import CONSOLE, attempt, html_response, session_of
from .html import esc, form, hidden, link, page, query, state, table, when

__all__ = ["add_routes"]

#: What each action does, as the confirmation page says it.
ACTIONS = {
    "rotate": (
        "Rotate",
        "The pre-active epoch becomes active, the active one is deactivated and a new "
        "pre-active one is made. Consumers fetch the new secret; objects sealed before stay "
        "readable until the old epoch is destroyed.",
    ),
    "compromise": (
        "Mark compromised",
        "The active epoch is marked compromised and the pre-active one takes over at once. "
        "Consumers and proxies learn that objects sealed under it are not to be trusted.",
    ),
    "destroy": (
        "Destroy retired epochs",
        "The secrets of every deactivated and compromised epoch of this resource are "
        "overwritten and cleared now, whatever the retention: objects sealed under them can "
        "never be opened again.",
    ),
}


async def resources_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    wanted = request.query.get("q", "")[:255]
    rows = []
    for resource in await console.store.resources():
        if wanted and wanted.lower() not in resource.id.lower():
            continue
        epochs = await console.store.epochs(resource.id)
        rows.append(
            [
                link("/resource", resource.id, id=resource.id),
                esc(resource.producer_id),
                esc(resource.profile),
                esc(f"{resource.rotation_period}s" if resource.rotation_period else "never"),
                esc(epoch_runs([(e.epoch, e.state) for e in epochs])),
            ]
        )
        if len(rows) >= 500:
            break
    search = (
        '<form class="panel" method="get" action="/resources">'
        f'<label>Id contains<input name="q" value="{esc(wanted)}" maxlength="255"></label>'
        '<button type="submit" class="quiet">Filter</button></form>'
    )
    body = search + table(("id", "producer", "profile", "rotation", "epochs"), rows, "none")
    return html_response(page("Resources", body, session, "/resources"))


async def _resource_or_back(request: web.Request, resource_id: str) -> Resource:
    console = request.app[CONSOLE]
    resource = await console.store.resource(resource_id) if is_resource_id(resource_id) else None
    if resource is None:
        session_of(request).flash("error", f"no resource {resource_id!r}")
        raise web.HTTPSeeOther("/resources")
    return resource


async def resource_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    resource = await _resource_or_back(request, request.query.get("id", ""))
    epochs = await console.store.epochs(resource.id)
    timeline = [
        [
            esc(e.epoch),
            state(e.state),
            when(e.created_at),
            when(e.activated_at),
            when(e.deactivated_at),
        ]
        for e in reversed(epochs)
    ]
    actions = " ".join(
        link("/resource/confirm", ACTIONS[a][0] + "…", id=resource.id, action=a) for a in ACTIONS
    )
    body = (
        table(
            ("id", "producer", "content format", "profile", "max age", "rotation", "registered"),
            [
                [
                    esc(resource.id),
                    link("/device", resource.producer_id, id=resource.producer_id),
                    esc(resource.content_format),
                    esc(resource.profile),
                    esc(f"{resource.max_age}s"),
                    esc(f"{resource.rotation_period}s" if resource.rotation_period else "never"),
                    when(resource.registered_at),
                ]
            ],
        )
        + f'<p class="actions">{actions}</p>'
        + "<h2>Epochs (newest first)</h2>"
        + table(("epoch", "state", "created", "activated", "deactivated"), timeline)
    )
    return html_response(page(f"Resource {resource.id}", body, session, "/resources"))


async def confirm(request: web.Request) -> web.Response:
    session = session_of(request)
    resource = await _resource_or_back(request, request.query.get("id", ""))
    action = request.query.get("action", "")
    if action not in ACTIONS:
        raise web.HTTPSeeOther("/resources")
    title, what = ACTIONS[action]
    body = (
        f'<div class="confirm"><p>{esc(title)}: the resource</p>'
        f'<p class="name">{esc(resource.id)}</p><p>{esc(what)}</p>'
        + form(
            session,
            "/resource/act",
            hidden("id", resource.id) + hidden("action", action),
            f"{title}: {resource.id}",
            danger=True,
        )
        + " "
        + link("/resource", "Cancel", id=resource.id)
        + "</div>"
    )
    return html_response(page(f"{title}?", body, session, "/resources"))


async def act(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    data = await request.post()
    resource_id, action = str(data.get("id", "")), str(data.get("action", ""))

    async def work() -> str:
        if not is_resource_id(resource_id) or action not in ACTIONS:
            raise NoSuchRecord(f"no resource {resource_id!r}")
        now, actor = console.wall(), session.actor
        if action == "rotate":
            epoch = await console.store.rotate(resource_id, now, actor=actor, reason="console")
            return f"rotated {resource_id}: epoch {epoch} active"
        if action == "compromise":
            active = await console.store.compromise(resource_id, None, now, actor=actor)
            return f"{resource_id}: the active epoch compromised; epoch {active} active"
        destroyed = await console.store.destroy_retired(resource_id, now, actor=actor)
        return f"{resource_id}: destroyed epoch(s) {', '.join(map(str, destroyed)) or 'none'}"

    await attempt(session, work())
    if is_resource_id(resource_id):
        raise web.HTTPSeeOther("/resource?" + query(id=resource_id))
    raise web.HTTPSeeOther("/resources")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/resources", resources_page)
    app.router.add_get("/resource", resource_page)
    app.router.add_get("/resource/confirm", confirm)
    app.router.add_post("/resource/act", act)
