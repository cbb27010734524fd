"""The producer's metrics (``oscar-producer --metrics HOST:PORT``), read from the running
:class:`~producer.core.Producer` at each scrape (nothing is counted twice on the hot paths: the
figures are those the producer keeps anyway).

- ``oscar_producer_requests_total{path}``: GETs of the served objects (``fast``: answered before
  aiocoap, :mod:`producer.fastpath`; ``slow``: through aiocoap, block-wise and Observe included);
- ``oscar_producer_objects_sealed_total`` and ``oscar_producer_seal_seconds`` (a histogram: seq
  allocation, encryption and signature of one object);
- ``oscar_producer_sequence_windows_saved_total``: durable writes of a reserved seq window;
- ``oscar_producer_observers`` (held now), ``oscar_producer_observations_refused_total``,
  ``oscar_producer_observations_displaced_total``, ``oscar_producer_notifications_total``;
- ``oscar_producer_publications_total{outcome}`` (PUTs to proxies: ``accepted``, ``failed``);
- with ``multicast`` (:mod:`producer.groups`): ``oscar_producer_group_datagrams_total``
  (notifications sent to groups, one per object per group), ``oscar_producer_group_too_large_total``
  (objects not sent to groups: over one datagram), ``oscar_producer_group_requests_total{outcome}``
  (group GETs: ``answered`` with the object, ``challenged`` with a 4.01 Echo, ``ignored``);
- ``oscar_producer_resources_unsealable``: resources with no epoch secret they may seal under now
  (the AS away past both known epochs, or never reached): the alarm to set.

With ``per_resource``, the sealing and request families also carry ``resource`` (the resource id).
"""

from __future__ import annotations

from typing import Any

from oscar_io.metrics import Histogram, Metrics

__all__ = ["producer_metrics"]


def producer_metrics(producer: Any, *, per_resource: bool = False) -> Metrics:
    """The families of a started :class:`~producer.core.Producer`."""
    m = Metrics("oscar_producer", per_resource=per_resource)
    by = ("resource",) if per_resource else ()
    requests = m.counter("requests", "GETs of the served objects, by path.", "path")
    per_request = (
        m.counter("resource_requests", "GETs of the served objects, by resource.", "resource")
        if per_resource
        else None
    )
    sealed = m.counter("objects_sealed", "Objects sealed (encrypted and signed).", *by)
    seal_seconds = m.histogram("seal_seconds", "Seconds to seal one object.", *by)
    windows = m.counter("sequence_windows_saved", "Durable writes of a reserved seq window.")
    observers = m.gauge("observers", "Observations held now.")
    refused = m.counter("observations_refused", "Observe registrations refused (bounds).")
    displaced = m.counter("observations_displaced", "Unconfirmed observations displaced.")
    notifications = m.counter("notifications", "Observe notifications sent.")
    publications = m.counter("publications", "Objects published to proxies, by outcome.", "outcome")
    group_datagrams = m.counter("group_datagrams", "Notifications sent to multicast groups.")
    group_too_large = m.counter("group_too_large", "Objects too large for a group datagram.")
    group_requests = m.counter("group_requests", "Group GETs, by outcome.", "outcome")
    unsealable = m.gauge(
        "resources_unsealable", "Resources without an epoch secret they may seal under now."
    )

    def read() -> None:
        server = producer.server
        routes = getattr(server, "routes", {}) if server is not None else {}
        fast_path = getattr(server, "fast_path", None)
        fast = fast_path.answered if fast_path is not None else 0
        # The fast path counts its answers in resource.requests too.
        requests.set("fast", value=fast)
        requests.set("slow", value=sum(r.requests for r in routes.values()) - fast)
        if per_request is not None:
            for resource in routes.values():
                per_request.set(resource.published.resource_id, value=resource.requests)
        resources = list(producer.resources.values())
        if per_resource:
            for published in resources:
                sealed.set(published.resource_id, value=published.sealed_count)
                seal_seconds.values[(published.resource_id,)] = published.seal_seconds
        else:
            sealed.set(value=sum(p.sealed_count for p in resources))
            seal_seconds.values[()] = _merged([p.seal_seconds for p in resources])
        now = producer.now()
        unsealable.set(value=sum(1 for p in resources if not p.may_seal(now)))
        if producer.state is not None:
            windows.set(value=producer.state.sequences.saves)
        limits = producer.observer_limits
        if limits is not None:
            observers.set(value=limits.total)
            refused.set(value=limits.refused)
            displaced.set(value=limits.displaced)
            notifications.set(value=limits.notifications)
        groups = getattr(producer, "groups", None)
        if groups is not None:
            group_datagrams.set(value=groups.sent)
            group_too_large.set(value=groups.too_large)
            for outcome in ("answered", "challenged", "ignored"):
                group_requests.set(outcome, value=getattr(groups, outcome))
        publisher = producer.publisher
        if publisher is not None:
            publications.set("accepted", value=sum(publisher.published))
            publications.set("failed", value=sum(publisher.failures))

    m.reader(read)
    return m


def _merged(histograms: list[Histogram]) -> Histogram:
    """One histogram of several with the same buckets (the producer's resources together)."""
    if len(histograms) == 1:
        return histograms[0]
    out = Histogram()
    for histogram in histograms:
        out.counts = [a + b for a, b in zip(out.counts, histogram.counts, strict=True)]
        out.total += histogram.total
        out.count += histogram.count
    return out
