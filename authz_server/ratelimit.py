"""A per-identity request rate limit: one token bucket per authenticated device.

Each identity may make ``burst`` requests at once and ``rate`` requests per second on average.
:meth:`RateLimit.take` spends one token and returns 0.0, or returns how many seconds the caller
must wait before a token is available (the server turns that into 4.29 with Max-Age).

Pure: no clock, no I/O, no asyncio. The time comes in as ``now`` (any monotonic seconds), so
tests pin it. Memory is bounded by the number of identities seen since the last :meth:`prune`
(the server only ever passes authenticated device ids, and prunes full buckets regularly).
"""

from __future__ import annotations

__all__ = ["RateLimit"]


class RateLimit:
    """Token buckets keyed by identity."""

    __slots__ = ("_buckets", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        """Raises ValueError unless ``rate`` > 0 and ``burst`` >= 1."""
        if not (isinstance(rate, (int, float)) and rate > 0 and rate != float("inf")):
            raise ValueError("the rate must be a positive number of requests per second")
        if type(burst) is not int or burst < 1:
            raise ValueError("the burst must be a whole number of requests, at least 1")
        self.rate = float(rate)
        self.burst = burst
        # identity -> (tokens, time of that count)
        self._buckets: dict[str, tuple[float, float]] = {}

    def __repr__(self) -> str:
        return f"RateLimit(rate={self.rate}, burst={self.burst}, identities={len(self._buckets)})"

    def _level(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        # A clock that steps back never adds tokens (nor takes them away).
        return min(float(self.burst), tokens + max(0.0, now - then) * self.rate)

    def take(self, key: str, now: float) -> float:
        """Spend one token of ``key``: 0.0 if allowed, else the seconds until one is available
        (nothing is spent then)."""
        tokens = self._level(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def prune(self, now: float) -> int:
        """Forget identities whose bucket has refilled (they are as good as new). Returns how many
        were dropped."""
        full = [key for key in self._buckets if self._level(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)
