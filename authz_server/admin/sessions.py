"""The admin console's sessions and login limits: pure state, no I/O, the clock passed in.

A session is made at login: a random id (256 bits) that the browser holds in a ``__Host-``
cookie (Secure, HttpOnly, SameSite=Strict, Path=/), and a random CSRF token that every form of
the session carries and every POST must return (:meth:`Session.csrf_ok`, a constant-time
comparison). A session ends at logout, after :attr:`SessionPolicy.idle` seconds without a
request, :attr:`SessionPolicy.absolute` seconds after login whatever happens, or when its admin's
token is revoked or expires (checked by :mod:`.app` at each request). At most
:attr:`SessionPolicy.max_sessions` live at once (the oldest goes). Sessions are the process's own:
with several AS instances, each has its own (a revocation in the shared store ends them all).

A session also holds its flash messages (shown once, on the next page) and the credentials
bundles enrolled through it, each downloadable once within :data:`BUNDLE_LIFETIME` seconds.

What it does not do: check tokens (the store does), or speak HTTP (:mod:`.app`).
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["BUNDLE_LIFETIME", "Session", "SessionPolicy", "Sessions"]

#: Seconds an enrolled device's bundle waits for its one download.
BUNDLE_LIFETIME = 600.0


@dataclass(frozen=True)
class SessionPolicy:
    idle: float = 900.0
    absolute: float = 8 * 3600.0
    max_sessions: int = 1000

    def __post_init__(self) -> None:
        if not (0 < self.idle <= self.absolute) or self.max_sessions < 1:
            raise ValueError("a session policy needs 0 < idle <= absolute and max_sessions >= 1")


@dataclass(eq=False)
class Session:
    """One admin's login; see the module docstring. Its ``repr`` holds no id or token."""

    admin: str
    #: When the admin's token was issued: a token issued again under the name is another login.
    token_issued: int
    created: float
    last: float
    id: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    flashes: list[tuple[str, str]] = field(default_factory=list, repr=False)
    bundles: dict[str, tuple[str, bytes, float]] = field(default_factory=dict, repr=False)

    @property
    def actor(self) -> str:
        """The audit actor of this admin's actions."""
        return f"admin:{self.admin}"

    def csrf_ok(self, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.csrf.encode())

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))
        del self.flashes[:-10]

    def take_flashes(self) -> list[tuple[str, str]]:
        flashes, self.flashes = self.flashes, []
        return flashes

    def keep_bundle(self, device_id: str, data: bytes, now: float) -> str:
        """Hold a bundle for one download; returns its download id."""
        self.bundles = {k: v for k, v in self.bundles.items() if v[2] > now}
        key = secrets.token_urlsafe(16)
        self.bundles[key] = (device_id, data, now + BUNDLE_LIFETIME)
        return key

    def take_bundle(self, key: str, now: float) -> tuple[str, bytes] | None:
        """The bundle of ``key`` once (then it is gone), or None (taken, expired, unknown)."""
        held = self.bundles.pop(key, None)
        if held is None or held[2] <= now:
            return None
        return held[0], held[1]


class Sessions:
    """The live sessions by id."""

    def __init__(self, policy: SessionPolicy = SessionPolicy()) -> None:
        self.policy = policy
        self._live: OrderedDict[str, Session] = OrderedDict()

    def __repr__(self) -> str:
        return f"Sessions({len(self._live)} live)"

    def __len__(self) -> int:
        return len(self._live)

    def start(self, admin: str, token_issued: int, now: float) -> Session:
        session = Session(admin, token_issued, now, now)
        self._live[session.id] = session
        while len(self._live) > self.policy.max_sessions:
            self._live.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session of ``session_id`` (its idle time restarted), or None: unknown,
        idle too long or too old (then it is ended)."""
        if not session_id:
            return None
        session = self._live.get(session_id)
        if session is None:
            return None
        if now - session.last >= self.policy.idle or now - session.created >= self.policy.absolute:
            self.end(session)
            return None
        session.last = now
        return session

    def end(self, session: Session) -> None:
        self._live.pop(session.id, None)
        session.bundles.clear()

    def end_admin(self, admin: str) -> int:
        """End every session of ``admin``; how many."""
        ended = [s for s in self._live.values() if s.admin == admin]
        for session in ended:
            self.end(session)
        return len(ended)
