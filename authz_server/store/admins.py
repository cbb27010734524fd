"""The admin console's named tokens: issued once, stored only as a keyed hash, listed, revoked.

``oscar-as admin-token --name NAME`` issues a token: 32 random bytes from the operating system,
shown once as ``oscar-admin-`` and their URL-safe base64. The database keeps, per admin name, only
``HMAC-SHA256(token key, token)``, the token key derived from the master key (through the
envelope's HMAC key, under a prefix no audit chain or checkpoint input can start with). Why that
and not a password hash: the token has 256 bits of entropy, so no guess list exists for a slow
hash to slow down, and a lookup by the hash is one indexed read; the key adds that whoever reads
the database alone (a PostgreSQL dump, a backup) cannot even test a token offline, and whoever can
write it cannot plant a hash of a token of his own without the master key.

The table lives in the AS store, so several AS instances on one PostgreSQL database accept the
same tokens, and a revocation takes effect on all of them at the next login (sessions are each
instance's own, see :mod:`authz_server.admin.sessions`).

Rules: a name is a device-id-like name (letters, digits, ``. _ -``, up to 32); a name holds one
token at a time: a new token for a name whose token is live is a :class:`Conflict` (revoke it
first), one for a revoked or expired token replaces it. Issuing and revoking are audited (actor
``admin`` from the command line); a token is never in a record, a log line or a repr.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass

from oscar.names import is_device_id

from ..envelope import Envelope
from .audit import AuditLog
from .backend import Backend
from .schema import Conflict, NoSuchRecord

__all__ = ["TOKEN_PREFIX", "Admin", "AdminTokens"]

#: What every token starts with (recognisable in a secret scanner, never part of the hash's key).
TOKEN_PREFIX = "oscar-admin-"  # noqa: S105 (a prefix, not a secret)
_TOKEN_BYTES = 32
#: The HMAC input that derives the token key: no audit chain input (which starts with 0x87 at
#: offset 0 or 32) nor a checkpoint's (0xff * 33) starts so.
_KEY_INPUT = b"\xfe" * 33 + b"OSCAR admin tokens"


@dataclass(frozen=True, slots=True)
class Admin:
    """An admin name and its token's dates (never the token or its hash)."""

    name: str
    created_at: int
    expires_at: int | None
    revoked_at: int | None

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class AdminTokens:
    """The ``admins`` table over a store's backend."""

    def __init__(self, db: Backend, envelope: Envelope, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self._key = envelope.chain(_KEY_INPUT, b"")

    def __repr__(self) -> str:
        return "AdminTokens(<key redacted>)"

    def token_hash(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode("utf-8", "surrogatepass"), "sha256").digest()

    async def issue_admin_token(
        self, name: str, expires_at: int | None, now: int, *, actor: str = "admin"
    ) -> str:
        """A new token for ``name`` (returned once, stored as its hash). ValueError for a
        malformed name or a past expiry; :class:`Conflict` if the name's token is live."""
        if not is_device_id(name):
            raise ValueError(
                "an admin name is 1 to 32 of A-Z a-z 0-9 . _ - and starts with a letter or digit"
            )
        if expires_at is not None and expires_at <= now:
            raise ValueError("the token's expiry is in the past")
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(
            secrets.token_bytes(_TOKEN_BYTES)
        ).decode().rstrip("=")
        sql = self.db.sql
        async with self.db.transaction():
            row = await self.db.one(sql.ADMIN, (name,))
            if row is not None and Admin(*row).status(now) == "active":
                raise Conflict(f"admin {name!r} has a live token; revoke it first")
            await self.db.execute(sql.ADMIN_SET, (name, self.token_hash(token), now, expires_at))
            await self.audit.append(
                actor, "admin-token", name, "ok", {"expires_at": expires_at}, now
            )
        return token

    async def admin(self, name: str) -> Admin | None:
        row = await self.db.one(self.db.sql.ADMIN, (name,))
        return None if row is None else Admin(*row)

    async def admins(self) -> list[Admin]:
        return [Admin(*row) for row in await self.db.all(self.db.sql.ADMINS)]

    async def revoke_admin_token(self, name: str, now: int, *, actor: str = "admin") -> None:
        """Revoke ``name``'s token: :class:`NoSuchRecord` for an unknown name, :class:`Conflict`
        for a token revoked already."""
        sql = self.db.sql
        async with self.db.transaction():
            row = await self.db.one(sql.ADMIN, (name,))
            if row is None:
                raise NoSuchRecord(f"no admin {name!r}")
            if not await self.db.execute(sql.ADMIN_REVOKE, (now, name)):
                raise Conflict(f"the token of admin {name!r} is revoked already")
            await self.audit.append(actor, "revoke-admin-token", name, "ok", {}, now)

    async def admin_of_token(self, token: str, now: int) -> Admin | None:
        """The admin whose live token ``token`` is, or None (unknown, revoked, expired or
        malformed: the caller says no without telling which)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
            return None
        row = await self.db.one(self.db.sql.ADMIN_OF_HASH, (self.token_hash(token),))
        if row is None:
            return None
        admin = Admin(*row)
        return admin if admin.status(now) == "active" else None
