"""The AS's metrics (``oscar-as serve --metrics HOST:PORT``): what :mod:`oscar_io.metrics` exports.

- ``oscar_as_requests_total{endpoint, outcome}``: every answer, the early refusals included
  (unknown identity, rate limit, size). ``endpoint`` is ``METHOD /path`` of a known endpoint or
  ``other``; ``outcome`` is one of :data:`OUTCOMES`, from the answer's code.
- ``oscar_as_request_seconds{endpoint}``: time to answer, from the site's entry to the reply.
- ``oscar_as_rotations_total{reason}`` (``{reason, resource}`` with per-resource labels), and
  ``oscar_as_epochs_destroyed_total``, ``oscar_as_grants_expired_total``,
  ``oscar_as_key_notifications_total``: what this instance's schedule did.
- Read at each scrape: DTLS connections, hellos admitted by cookie, connections evicted,
  datagrams whose handling failed, devices that may connect, ``/keys`` observations, and whether
  the database answered at the last poll (``oscar_as_database_up``).

Labels never hold a device id, a payload or a secret; resource names only with ``per_resource``.
"""

from __future__ import annotations

from typing import Any

from oscar_io.metrics import OUTCOMES, Metrics, outcome_of

from .api import is_endpoint

__all__ = ["OUTCOMES", "AsMetrics", "endpoint_label", "outcome_of"]


def endpoint_label(method: str, path: tuple[str, ...]) -> str:
    """``GET /cert`` for a known endpoint, ``other`` for anything else (a peer's path never
    becomes a label of its own)."""
    if is_endpoint(method, path):
        return f"{method} /{'/'.join(path)}"
    return "other"


class AsMetrics:
    """The AS's families, and the readers of its live state (set by :meth:`watch`)."""

    def __init__(self, *, per_resource: bool = False) -> None:
        m = self.metrics = Metrics("oscar_as", per_resource=per_resource)
        self.requests = m.counter(
            "requests", "Requests answered, by endpoint and outcome.", "endpoint", "outcome"
        )
        self.latency = m.histogram(
            "request_seconds", "Seconds to answer a request, by endpoint.", "endpoint"
        )
        rotation_labels = ("reason", "resource") if per_resource else ("reason",)
        self.rotations = m.counter(
            "rotations", "Epoch rotations this instance made.", *rotation_labels
        )
        self.destroyed = m.counter(
            "epochs_destroyed", "Epochs this instance destroyed at the end of their retention."
        )
        self.grants_expired = m.counter("grants_expired", "Grants this instance ended at expiry.")
        self.notifications = m.counter(
            "key_notifications", "Resources whose /keys observers were notified of a change."
        )
        self.database_up = m.gauge(
            "database_up", "1 if the database answered the last poll, 0 if not."
        )
        self.database_up.set(value=1)
        self._connections = m.gauge("dtls_connections", "DTLS connections in the table.")
        self._verified = m.counter(
            "dtls_hellos_admitted", "ClientHellos that returned the cookie (new handshakes)."
        )
        self._evicted = m.counter(
            "dtls_connections_evicted", "Connections dropped: table full, idle, replaced."
        )
        self._failed = m.counter(
            "dtls_datagrams_failed", "Datagrams whose handling raised (dropped alone)."
        )
        self._devices = m.gauge("devices_allowed", "Active devices that may connect.")
        self._observations = m.gauge("key_observations", "Resources with /keys observers.")

    def request(self, endpoint: str, dotted: str, seconds: float | None = None) -> None:
        self.requests.inc(endpoint, outcome_of(dotted))
        if seconds is not None:
            self.latency.observe(endpoint, value=seconds)

    def rotated(self, resource_id: str, reason: str) -> None:
        if self.metrics.per_resource:
            self.rotations.inc(reason, resource_id)
        else:
            self.rotations.inc(reason)

    def watch(self, guard: Any, creds: Any, site: Any) -> None:
        """Read the connection guard's counters, the credentials and the site at each scrape."""

        def read() -> None:
            self._connections.set(value=len(guard))
            self._verified.set(value=guard.verified)
            self._evicted.set(value=guard.evicted)
            self._failed.set(value=guard.failed)
            self._devices.set(value=len(creds.device_ids()))
            self._observations.set(value=len(site.observed()))

        self.metrics.reader(read)
