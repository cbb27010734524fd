"""Where a request goes and which resource its answer must be of: :func:`parse_target`.

A producer serves resource ``<producer>/<path>`` at CoAP path ``/<producer>/<path>``, so the
resource an object must be of is the URI's path (``resource=`` overrides it, for a reverse proxy
with another prefix). With ``proxy=`` the request goes to that forward proxy with Proxy-Uri set to
the URI; ``PROXY_ID=coaps://HOST[:PORT]`` names an OSCAR proxy reached over DTLS.

What this module does not do: send anything, or resolve a host name.
"""

from __future__ import annotations

import urllib.parse
from typing import NamedTuple

from oscar import names

__all__ = ["Target", "parse_target"]


class Target(NamedTuple):
    """Where to send a request and which resource the answer must be of."""

    uri: str
    resource_id: str
    proxy: str | None
    #: The device id of an OSCAR proxy reached over DTLS (``coaps://``) with our link PSK.
    proxy_id: str | None = None

    @property
    def peer(self) -> str:
        """The host the request goes to, for messages."""
        return self.proxy or urllib.parse.urlsplit(self.uri)._replace(path="", query="").geturl()


def _check_coap_uri(uri: str, what: str, scheme: str = "coap") -> urllib.parse.SplitResult:
    if not isinstance(uri, str):
        raise TypeError(f"the {what} must be a string")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != scheme:
        raise ValueError(f"the {what} must be a {scheme}:// URI")
    try:
        parts.port  # noqa: B018 (raises ValueError for a malformed port)
    except ValueError:
        raise ValueError(f"the {what} has a malformed port") from None
    if not parts.hostname or parts.username is not None or parts.fragment:
        raise ValueError(f"the {what} must name a host, with no user name or fragment")
    return parts


def parse_target(uri: str, *, resource: str | None = None, proxy: str | None = None) -> Target:
    """Check a request URI (and proxy URI); the resource is ``resource`` or the URI's path.

    ``proxy`` is ``coap://HOST[:PORT]``, or ``PROXY_ID=coaps://HOST[:PORT]`` for an OSCAR proxy
    reached over DTLS (``PROXY_ID`` its device id; the link PSK comes from the AS).
    Raises ``ValueError`` saying what is wrong.
    """
    parts = _check_coap_uri(uri, "URI")
    if resource is None:
        try:
            resource = urllib.parse.unquote(parts.path.removeprefix("/"), errors="strict")
        except UnicodeDecodeError:
            resource = ""
        if not names.is_resource_id(resource):
            raise ValueError(
                "the URI's path is not a resource id '/<producer id>/<path>' (use --resource)"
            )
    else:
        names.require_resource_id(resource)
    proxy_id = None
    if proxy is not None:
        name, sep, rest = proxy.partition("=")
        if sep and "://" not in name:
            if not names.is_device_id(name):
                raise ValueError("PROXY_ID=coaps://HOST[:PORT]: PROXY_ID is the proxy's device id")
            proxy_id, proxy = name, rest
            proxy_parts = _check_coap_uri(proxy, "proxy URI", "coaps")
        else:
            proxy_parts = _check_coap_uri(proxy, "proxy URI")
        if proxy_parts.path not in ("", "/") or proxy_parts.query:
            raise ValueError("the proxy URI is coap://HOST[:PORT], with no path")
        proxy = proxy.rstrip("/")
    return Target(uri, resource, proxy, proxy_id)
