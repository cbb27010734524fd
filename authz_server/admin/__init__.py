"""The AS's admin console: HTTPS pages on the AS's own event loop (``oscar-as serve --admin``).

The package, one idea per module::

    __init__   start_console / Console: the running console; check_console_address
    tls        the server certificate from the AS CA, its key in memory only
    sessions   sessions, CSRF tokens, bundles held for one download (pure state)
    app        the aiohttp application: security headers, Host/Origin/CSRF/session checks,
               login (rate limited, audited) and logout
    html       page layout, tables, forms, the style sheet; every value escaped
    devices    overview; devices: list, one device, enrol (bundle once), revoke
    health     the overview's AS instances: each one's heartbeat and health
    grants     grants: list, preview of a pattern, add, revoke
    resources  resources: list, timeline of epochs, rotate / compromise / destroy (confirmed)
    audit      the audit log: filter, verify, export as JSON

Every action goes through the store methods the admin CLI uses, audited under ``admin:NAME``
(the token's name, from ``oscar-as admin-token``). aiohttp comes with the ``ops`` extra; nothing
here is imported unless ``--admin`` is given.

What it does not do: serve plain HTTP, render a PSK or secret (the one-time bundle aside), run
JavaScript, or let anyone in without a live token.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oscar_io.ports import tcp_bind_error
from oscar_io.webserve import start_site

if TYPE_CHECKING:
    from ..ca import CertificateAuthority
    from ..store import Store
    from .sessions import SessionPolicy

__all__ = ["Console", "ConsoleUnavailable", "check_console_address", "start_console"]


class ConsoleUnavailable(Exception):
    """``--admin`` cannot be served: aiohttp missing, or the address cannot be bound."""


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_console_address(host: str, port: int) -> None:
    """Before the AS starts: raise :class:`ConsoleUnavailable` if the console could not be
    served at ``host:port`` (no aiohttp, the any-address, a port taken)."""
    if importlib.util.find_spec("aiohttp") is None:
        raise ConsoleUnavailable("--admin needs aiohttp: pip install 'oscar-iot[ops]'")
    try:
        if ipaddress.ip_address(host).is_unspecified:
            raise ConsoleUnavailable(
                f"--admin needs the address browsers use (its certificate names it), not {host}"
            )
    except ValueError:
        pass
    problem = tcp_bind_error(host, port)
    if problem is not None:
        raise ConsoleUnavailable(f"--admin {_joined(host, port)}: {problem}")


@dataclass
class Console:
    """A running console; :meth:`close` stops it."""

    runner: Any
    host: str
    port: int
    certificate_pem: bytes

    @property
    def url(self) -> str:
        return f"https://{_joined(self.host, self.port)}/"

    def __repr__(self) -> str:
        return f"Console({self.url})"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_console(
    store: Store,
    ca: CertificateAuthority,
    host: str,
    port: int,
    now: int,
    *,
    policy: SessionPolicy | None = None,
) -> Console:
    """Serve the console at ``https://host:port/`` on the running loop (port 0: a free one)."""
    from aiohttp import web

    from . import audit, devices, grants, resources
    from .app import ConsoleState, make_app
    from .sessions import SessionPolicy
    from .tls import certificate_hosts, server_context

    context, chain = server_context(ca, host, now)

    def routes(app: web.Application) -> None:
        for module in (devices, grants, resources, audit):
            module.add_routes(app)

    state = ConsoleState(store, frozenset(), policy or SessionPolicy())
    app = make_app(state, routes)
    runner, bound = await start_site(app, host, port, ssl_context=context)
    state.hosts = frozenset(_joined(name, bound) for name in certificate_hosts(host))
    return Console(runner, host, bound, chain)
