"""An aiohttp application served on the running event loop: the metrics endpoint
(:mod:`oscar_io.metrics`) and the AS's admin console (:mod:`authz_server.admin`) start theirs
here. aiohttp is imported by the caller (the ``ops`` extra); this module only binds and reports
the port bound."""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["start_site"]


async def start_site(
    app: Any, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> tuple[Any, int]:
    """Serve ``app`` on ``host``:``port`` (port 0: a free one): (its runner, to ``cleanup()``
    at the end, and the port bound). Binds with SO_REUSEADDR, as servers do (a restart finds
    its earlier connections in TIME_WAIT). OSError if the address cannot be bound; nothing is
    left running then."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound
