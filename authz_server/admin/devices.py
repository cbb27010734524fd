"""The console's overview and devices pages: counts, what is due, recent denials and events;
the devices (filtered), one device with its certificate and grants, enrolment with its bundle
downloadable once, revocation behind a confirmation.

Each action calls the store method the admin CLI calls (``add_device``, ``revoke_device``), with
the actor ``admin:NAME``. The PSK of a new device is in the bundle only: held in the session's
memory for one download (:mod:`.sessions`), never in a page.

What it does not do: grants, resources or the audit log's own page (:mod:`.grants`,
:mod:`.resources`, :mod:`.audit`).
"""

from __future__ import annotations

import os
import time
from collections import Counter

from aiohttp import web
from cryptography import x509

from oscar.names import is_device_id
from oscar_io.bundle import LINK_PSK_LENGTH

from ..ca import credentials_bundle
from ..store import ROLES, AuditRecord, NoSuchRecord
from .app import CONSOLE, attempt, html_response, session_of
from .health import instances_section
from .html import esc, form, hidden, link, page, query, state, table, when

__all__ = ["add_routes"]

_PLURAL = {"producer": "producers", "consumer": "consumers", "proxy": "proxies"}
#: Devices listed on one page at most (a filter narrows them).
MAX_LISTED = 500


def _records_rows(records: list[AuditRecord]) -> list[list[str]]:
    return [
        [esc(r.seq), when(r.at), esc(r.actor), esc(r.action), esc(r.subject), state(r.result)]
        for r in records
    ]


async def overview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    store, now = console.store, console.wall()
    devices = await store.devices()
    by_role = Counter((d.role, d.status) for d in devices)
    resources = await store.live_resources()
    grants = await store.grants(None)
    live_grants = [g for g in grants if g[5] is None and (g[3] is None or g[3] > now)]
    due = await store.due_rotations(now)
    soon = [r for r in await store.due_rotations(now + 3600) if r not in set(due)]
    recent = await store.recent_audit(limit=500)
    denials = [r for r in recent if r.result == "denied"][:10]
    instances = await store.instance_list()

    def card(number: object, label: str) -> str:
        return (
            f'<div class="card"><div class="n">{esc(number)}</div>'
            f'<div class="l">{esc(label)}</div></div>'
        )

    cards = "".join(
        card(by_role[(role, "active")], f"active {_PLURAL[role]}") for role in ROLES
    ) + "".join(
        (
            card(sum(1 for d in devices if d.status == "revoked"), "revoked devices"),
            card(len(resources), "live resources"),
            card(len(live_grants), "live grants"),
            card(len(due), "rotations due now"),
            card(len(soon), "due within an hour"),
        )
    )
    due_rows = [[link("/resource", r, id=r), "now"] for r in due[:50]] + [
        [link("/resource", r, id=r), "within an hour"] for r in soon[:50]
    ]
    body = (
        f'<div class="cards">{cards}</div>'
        + instances_section(instances, time.time())
        + "<h2>Epochs due for rotation</h2>"
        + table(("resource", "due"), due_rows, "nothing due within an hour")
        + "<h2>Recent denials</h2>"
        + table(("seq", "at", "actor", "action", "subject", "result"), _records_rows(denials))
        + "<h2>Recent audit events</h2>"
        + table(("seq", "at", "actor", "action", "subject", "result"), _records_rows(recent[:15]))
    )
    return html_response(page("Overview", body, session, "/"))


async def devices_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    wanted = request.query.get("q", "")[:64]
    role = request.query.get("role", "")
    devices = [
        d
        for d in await console.store.devices()
        if (not wanted or wanted.lower() in d.id.lower()) and (role not in ROLES or d.role == role)
    ]
    rows = []
    for d in devices[:MAX_LISTED]:
        action = ""
        if d.status == "active":
            action = link("/device/revoke", "revoke…", id=d.id)
        rows.append(
            [
                link("/device", d.id, id=d.id),
                esc(d.role),
                state(d.status),
                when(d.enrolled_at),
                when(d.revoked_at),
                action,
            ]
        )
    options = "".join(
        f'<option value="{esc(r)}"{" selected" if r == role else ""}>{esc(r)}</option>'
        for r in ("", *ROLES)
    )
    search = (
        '<form class="panel" method="get" action="/devices">'
        f'<label>Id contains<input name="q" value="{esc(wanted)}" maxlength="64"></label>'
        f'<label>Role<select name="role">{options}</select></label>'
        '<button type="submit" class="quiet">Filter</button></form>'
    )
    roles = "".join(f'<option value="{esc(r)}">{esc(r)}</option>' for r in ROLES)
    enroll = form(
        session,
        "/devices/enroll",
        '<label>Device id<input name="id" required maxlength="200"></label>'
        f'<label>Role<select name="role">{roles}</select></label>',
        "Enroll",
        css="panel",
    )
    more = (
        f'<p class="muted">{len(devices) - MAX_LISTED} more: narrow the filter.</p>'
        if len(devices) > MAX_LISTED
        else ""
    )
    body = (
        "<h2>Enroll a device</h2>"
        + enroll
        + "<h2>Devices</h2>"
        + search
        + table(("id", "role", "status", "enrolled", "revoked", ""), rows, "no device")
        + more
    )
    return html_response(page("Devices", body, session, "/devices"))


async def device_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    device_id = request.query.get("id", "")
    device = await console.store.device(device_id) if is_device_id(device_id) else None
    if device is None:
        session.flash("error", f"no device {device_id!r}")
        raise web.HTTPSeeOther("/devices")
    now = console.wall()
    der = await console.store.certificate(device_id=device.id, now=now)
    if der is None:
        certificate = '<p class="muted">No valid certificate.</p>'
    else:
        cert = x509.load_der_x509_certificate(der)
        certificate = table(
            ("serial", "subject", "not before", "not after"),
            [
                [
                    esc(format(cert.serial_number, "x")),
                    esc(cert.subject.rfc4514_string()),
                    esc(cert.not_valid_before_utc.isoformat()),
                    esc(cert.not_valid_after_utc.isoformat()),
                ]
            ],
        )
    grants = [
        [esc(g[0]), esc(g[2]), when(g[3]), when(g[4]), when(g[5])]
        for g in await console.store.grants(device.id)
    ]
    revoke = ""
    if device.status == "active":
        revoke = "<p>" + link("/device/revoke", "Revoke this device…", id=device.id) + "</p>"
    body = (
        table(
            ("id", "role", "status", "enrolled", "revoked"),
            [
                [
                    esc(device.id),
                    esc(device.role),
                    state(device.status),
                    when(device.enrolled_at),
                    when(device.revoked_at),
                ]
            ],
        )
        + "<h2>Certificate</h2>"
        + certificate
        + "<h2>Grants</h2>"
        + table(("id", "pattern", "until", "granted", "revoked"), grants)
        + revoke
    )
    return html_response(page(f"Device {device.id}", body, session, "/devices"))


async def enroll(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    data = await request.post()
    device_id, role = str(data.get("id", "")), str(data.get("role", ""))

    async def work() -> str:
        if not is_device_id(device_id):
            raise ValueError(
                "a device id is 1 to 32 of A-Z a-z 0-9 . _ - and starts with a letter or digit"
            )
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        psk = os.urandom(LINK_PSK_LENGTH)
        now = console.wall()
        # The bundle first: a state that cannot make one enrolls nothing.
        bundle = await credentials_bundle(console.store, device_id, role, psk)
        await console.store.add_device(device_id, role, psk, now, actor=session.actor)
        key = session.keep_bundle(device_id, bundle, console.mono())
        raise web.HTTPSeeOther("/devices/enrolled?" + query(d=key))

    await attempt(session, work())
    raise web.HTTPSeeOther("/devices")


async def enrolled(request: web.Request) -> web.Response:
    session = session_of(request)
    key = request.query.get("d", "")
    held = session.bundles.get(key)
    if held is None:
        body = '<p class="muted">No bundle waits here (downloaded already, or expired).</p>'
    else:
        body = (
            f"<p>Enrolled <strong>{esc(held[0])}</strong>. Its credentials bundle holds its PSK: "
            "it can be downloaded <strong>once</strong>, within ten minutes, from this session. "
            "Hand it to the device over a safe channel.</p>"
            f'<p><a class="download" href="/devices/bundle?{esc(query(d=key))}" download>'
            "Download the credentials bundle</a></p>"
        )
    return html_response(page("Device enrolled", body, session, "/devices"))


async def bundle(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    session = session_of(request)
    held = session.take_bundle(request.query.get("d", ""), console.mono())
    if held is None:
        body = '<p class="muted">This bundle was downloaded already, or it expired.</p>'
        return html_response(page("Bundle gone", body, session, "/devices"), status=410)
    device_id, data = held
    await console.store.audit(session.actor, "bundle-download", device_id, "ok", {}, console.wall())
    return web.Response(
        body=data,
        content_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{device_id}.json"'},
    )


async def revoke_confirm(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    device_id = request.query.get("id", "")
    device = await console.store.device(device_id) if is_device_id(device_id) else None
    if device is None:
        session.flash("error", f"no device {device_id!r}")
        raise web.HTTPSeeOther("/devices")
    body = (
        '<div class="confirm"><p>Revoke the device</p>'
        f'<p class="name">{esc(device.id)}</p>'
        f"<p>({esc(device.role)}): its PSK is erased, its certificates and grants revoked; "
        "a consumer's readable resources rotate, a producer's live epochs are marked "
        "compromised. This cannot be undone; its id is never reused.</p>"
        + form(
            session, "/device/revoke", hidden("id", device.id), "Revoke " + device.id, danger=True
        )
        + ' <a href="/devices">Cancel</a></div>'
    )
    return html_response(page("Revoke a device", body, session, "/devices"))


async def revoke(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    session = session_of(request)
    device_id = str((await request.post()).get("id", ""))

    async def work() -> str:
        if not is_device_id(device_id):
            raise NoSuchRecord(f"no device {device_id!r}")
        rotated = await console.store.revoke_device(device_id, console.wall(), actor=session.actor)
        return f"revoked device {device_id}; rotated: {', '.join(rotated) or 'none'}"

    await attempt(session, work())
    raise web.HTTPSeeOther("/devices")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", overview)
    app.router.add_get("/devices", devices_page)
    app.router.add_get("/device", device_page)
    app.router.add_post("/devices/enroll", enroll)
    app.router.add_get("/devices/enrolled", enrolled)
    app.router.add_get("/devices/bundle", bundle)
    app.router.add_get("/device/revoke", revoke_confirm)
    app.router.add_post("/device/revoke", revoke)
