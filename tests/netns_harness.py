"""The tests' private network namespace with multicast: :mod:`bench.netns` (the benchmark's too)."""

from __future__ import annotations

from bench.netns import (
    IPV4_INTERFACE,
    IPV6_INTERFACE,
    IPV6_OTHER,
    Namespace,
    available,
    multicast_namespace,
)

__all__ = [
    "IPV4_INTERFACE",
    "IPV6_INTERFACE",
    "IPV6_OTHER",
    "Namespace",
    "available",
    "multicast_namespace",
]
