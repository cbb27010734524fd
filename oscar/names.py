"""The grammar of device ids and resource ids, checked wherever one enters the system.

- A **device id** (producer, consumer, proxy) is 1 to 32 characters from ``A-Z a-z 0-9 . _ -``,
  starting with a letter or digit. 32 because it doubles as the DTLS PSK identity, which tinydtls
  caps at 32 bytes; no ``/`` so that ``<producer id>/<path>`` splits one way only.
- A **resource id** is ``<producer id>/<path>``, at most 255 characters; the path is one or more
  ``/``-separated segments of ``A-Z a-z 0-9 . _ ~ -``, none empty, ``.`` or ``..``.

Narrow on purpose: these names end up in file names, SQL parameters, URIs, certificates and logs,
and a grammar this small has no metacharacters for any of them. This module only checks; it raises
``ValueError`` with the rule that was broken (never echoing more than the caller passed).
"""

from __future__ import annotations

import re
from typing import TypeGuard

__all__ = ["is_device_id", "is_resource_id", "owns", "require_device_id", "require_resource_id"]

MAX_DEVICE_ID = 32
MAX_RESOURCE_ID = 255

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_RESOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}(?:/[A-Za-z0-9._~-]+)+")


def is_device_id(text: object) -> TypeGuard[str]:
    """Whether ``text`` is a well-formed device id."""
    return type(text) is str and _DEVICE_ID.fullmatch(text) is not None


def is_resource_id(text: object) -> TypeGuard[str]:
    """Whether ``text`` is a well-formed ``<producer id>/<path>``."""
    if type(text) is not str or len(text) > MAX_RESOURCE_ID:
        return False
    if _RESOURCE_ID.fullmatch(text) is None:
        return False
    if "/." not in text:  # no segment can be "." or "..": the usual case, one regex in all
        return True
    return all(segment not in (".", "..") for segment in text.split("/")[1:])


def owns(producer_id: str, resource_id: str) -> bool:
    """Whether ``resource_id`` is a well-formed resource of ``producer_id``."""
    return (
        is_device_id(producer_id)
        and is_resource_id(resource_id)
        and resource_id.startswith(producer_id + "/")
    )


def require_device_id(text: object, what: str = "device id") -> str:
    """Return ``text`` if it is a device id; ValueError stating the rule otherwise."""
    if not is_device_id(text):
        raise ValueError(
            f"a {what} is 1 to {MAX_DEVICE_ID} characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return text


def require_resource_id(text: object) -> str:
    """Return ``text`` if it is a resource id; ValueError stating the rule otherwise."""
    if not is_resource_id(text):
        raise ValueError(
            "a resource id is '<producer id>/<path>', at most 255 characters, with path segments "
            "of A-Z a-z 0-9 . _ ~ - (none empty, '.' or '..')"
        )
    return text
