"""Server URLs that may carry a password (a database's, a Redis's), and their form for messages.

:func:`redacted` is the one way a role shows such a URL in a log line, an error or a ``repr``: the
password of the user part and of a ``password=`` (or ``passfile=``) parameter become ``***``.
:func:`user_part_unclear` tells a URL whose user part cannot be read safely (a password with an
unencoded ``/``, ``?``, ``#`` or ``@``): checkers refuse such a URL instead of guessing where its
password ends.

What this module does not do: check a URL's scheme or shape for one kind of server (the AS store's
:func:`authz_server.store.check_database_url`, the proxy's :func:`proxy.config.check_cluster_url`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["redacted", "user_part_unclear"]


def user_part_unclear(url: str) -> bool:
    """Whether an ``@`` of ``url`` is not the one ending its user part (a password's
    unencoded ``/``, ``?``, ``#`` or ``@`` makes it so)."""
    rest = url.partition("://")[2]
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return "@" in rest
    return rest.count("@") > 1 or ("@" in rest and "@" not in netloc)


def redacted(url: str) -> str:
    """``url`` without its password, for messages: the password of the user part and of a
    ``password=`` parameter shown as ``***``; a URL whose user part cannot be told apart (an
    ``@`` past the host) shown as ``SCHEME://***@`` and its host."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    if user_part_unclear(url):
        return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{scheme}://***"
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = re.sub(r"(?i)(^|&)(password|passfile)=[^&]*", r"\1\2=***", parts.query)
    return parts._replace(query=query).geturl()
