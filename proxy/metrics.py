"""The proxy's metrics (``oscar-proxy --metrics HOST:PORT``): its live counters
(:meth:`proxy.core.Proxy.counters`, the same figures ``oscar-proxy stats`` prints) as Prometheus
families, read at each scrape.

- ``oscar_proxy_cache_hits_total{path}`` (``fast``: answered before aiocoap; ``slow``), and
  ``oscar_proxy_cache_misses_total``, ``..._revalidations_total``, ``..._stale_served_total``;
- ``oscar_proxy_upstream_fetches_total``, ``oscar_proxy_upstream_errors_total``;
- ``oscar_proxy_objects_verified_total``, ``oscar_proxy_objects_rejected_total`` (failed
  verification), ``oscar_proxy_publications_total
  {outcome}`` (``accepted``, ``refused``), ``oscar_proxy_echo_challenges_total``,
  ``oscar_proxy_signer_lookups_refused_total``, ``oscar_proxy_observations_declined_total``,
  ``oscar_proxy_evictions_total``;
- gauges: ``oscar_proxy_dtls_sessions``, ``oscar_proxy_observers{path}``,
  ``oscar_proxy_upstream_observations``, and the cache's
  ``oscar_proxy_cache_entries{tier}`` / ``oscar_proxy_cache_bytes{tier}`` (``memory``, ``disk``,
  ``large``: the bodies on disk of objects above 1 MiB);
- in a cluster, ``oscar_proxy_cluster_*`` (this instance's store reads, writes, events, waits,
  refusals, outages, leases) and ``oscar_proxy_cluster_up``. The cluster-wide sums of
  ``oscar-proxy stats`` are left out: Prometheus sums the instances itself.

No label holds a resource name, an address or an object byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oscar_io.metrics import Metrics

__all__ = ["proxy_metrics"]

# counter key -> (metric name, help)
_COUNTERS = {
    "misses": (
        "cache_misses",
        "Requests the cache could not answer (an upstream fetch or a wait).",
    ),
    "revalidations": ("cache_revalidations", "Cached objects revalidated upstream (ETag)."),
    "stale_served": ("cache_stale_served", "Objects served past Max-Age, upstream unreachable."),
    "upstream_requests": ("upstream_fetches", "Requests the proxy sent upstream."),
    "upstream_errors": ("upstream_errors", "Upstream requests that failed."),
    "rejected": ("objects_rejected", "Objects that failed verification (never cached)."),
    "verified": ("objects_verified", "Objects whose signature and signer checked out."),
    "echo_challenges": ("echo_challenges", "Echo challenges sent to unproven addresses."),
    "evictions": ("evictions", "Cache entries evicted for room."),
    "observations_declined": ("observations_declined", "Observe registrations over a bound."),
    "signer_lookups_refused": (
        "signer_lookups_refused",
        "Certificate lookups at the AS refused by the lookup budget.",
    ),
}

_CLUSTER = {
    "reads": "Reads of the shared store.",
    "writes": "Writes to the shared store.",
    "events": "Objects other instances stored, taken from the events.",
    "waits": "Waits for another instance's upstream fetch.",
    "refused": "Calls refused because the store could not be reached.",
    "outages": "Times the store became unreachable.",
    "leases_taken": "Upstream observation leases taken.",
}


def proxy_metrics(proxy: Any, dtls_sessions: Callable[[], int] | None = None) -> Metrics:
    """The families of a running :class:`~proxy.core.Proxy`: its live counters
    (``proxy.counters()``), its answers through aiocoap (``proxy.answers``,
    ``proxy.answer_seconds``), and its DTLS server's connections (``dtls_sessions()``)."""
    counters = proxy.counters
    m = Metrics("oscar_proxy")
    sessions = m.gauge("dtls_sessions", "DTLS connections (sessions and handshakes) held now.")
    answers = m.counter(
        "requests",
        "Requests answered through aiocoap (not the fast paths), by method and outcome.",
        "method",
        "outcome",
    )
    answer_seconds = m.histogram(
        "request_seconds", "Seconds to answer a request through aiocoap (fetches included)."
    )
    hits = m.counter("cache_hits", "Requests answered from the cache.", "path")
    plain = {key: m.counter(name, text) for key, (name, text) in _COUNTERS.items()}
    publications = m.counter(
        "publications", "Objects producers published (PUT), by outcome.", "outcome"
    )
    observers = m.gauge("observers", "Observers of the proxy's resources.", "path")
    relays = m.gauge("upstream_observations", "Observations the proxy holds upstream.")
    entries = m.gauge("cache_entries", "Cached objects.", "tier")
    size = m.gauge("cache_bytes", "Bytes of cached objects.", "tier")
    cluster = {key: m.counter(f"cluster_{key}", text) for key, text in _CLUSTER.items()}
    held = m.gauge("cluster_leases_held", "Upstream observations this instance leads.")
    up = m.gauge("cluster_up", "1 if the shared store answers, 0 if not (clustered only).")

    def read() -> None:
        if dtls_sessions is not None:
            sessions.set(value=dtls_sessions())
        for key, count in proxy.answers.items():
            answers.set(*key, value=count)
        answer_seconds.values[()] = proxy.answer_seconds
        doc = counters()
        fast = doc.get("fast_hits", 0)
        hits.set("fast", value=fast)
        hits.set("slow", value=doc.get("hits", 0) - fast)
        for key, family in plain.items():
            family.set(value=doc.get(key, 0))
        publications.set("accepted", value=doc.get("published", 0))
        publications.set("refused", value=doc.get("publish_refused", 0))
        fast_observers = doc.get("fast_observers", 0)
        observers.set("fast", value=fast_observers)
        observers.set("slow", value=doc.get("observers", 0) - fast_observers)
        relays.set(value=doc.get("upstream_observations", 0))
        for tier in ("memory", "disk", "large"):
            entries.set(tier, value=doc.get(f"{tier}_entries", 0))
            size.set(tier, value=doc.get(f"{tier}_bytes", 0))
        if "cluster_up" in doc:
            for key, family in cluster.items():
                family.set(value=doc.get(f"cluster_{key}", 0))
            held.set(value=doc.get("cluster_leases_held", 0))
            up.set(value=doc["cluster_up"])

    m.reader(read)
    return m
