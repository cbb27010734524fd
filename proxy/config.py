"""The proxy's configuration, from code, flags or a TOML file (:func:`load_config`)::

    bundle = "/etc/oscar/proxy-1.json"
    state = "/var/lib/oscar/proxy"
    listen = "192.0.2.1:5683"          # plain CoAP; DTLS (publishing, consumers) on port+1
                                       # (DTLS cannot bind a wildcard such as 0.0.0.0)
    plain = true                       # false: DTLS only
    dtls = true                        # false: plain CoAP only (no publishing)
    tcp = false                        # true: also CoAP over TCP (RFC 8323) on the listen port
    tls = false                        # true: also CoAP over TLS on port+1 (TCP): a certificate
                                       # from the AS at start; clients need one from the AS CA
    cluster = "redis://10.0.0.5:6379/0"  # instances of one bundle sharing a Redis-protocol store
                                       # (proxy.cluster); rediss:// for TLS
    cluster_password_file = "/etc/oscar/redis.pass"  # the password (first line), not in the URL

    [reverse]                          # prefix -> producer: /PREFIX/REST from URI/PREFIX/REST
    "sensor-1" = "coap://192.0.2.10:5683"

    [limits]
    memory_entries = 10000
    memory_bytes = 67108864
    disk_entries = 100000
    disk_bytes = 1073741824
    large_bytes = 1073741824           # disk for the bodies of objects above 1 MiB (on disk only)
    published_max_age = 60             # Max-Age of an object PUT without one
    max_fresh = 300                    # the most freshness any Max-Age gives an entry
    upstream_timeout = 5.0             # seconds per upstream request (per block of a large one)
    upstream_backoff = 5.0             # after an upstream failure, serve the cache this long
    links_refresh = 10.0               # seconds between fetches of the DTLS link keys from the AS
    signer_lookups = 60                # AS lookups of unknown signers (kids) per minute, in all
    signer_lookups_per_origin = 10     # the same per origin host (or publishing producer)
    observers = 4096                   # Observe registrations held at once, in all
    observers_per_client = 128         # ... per client (DTLS device, IPv4 address, IPv6 /64)
    relays = 1024                      # upstream observations at once, in all
    relays_per_client = 64             # ... that one client's registrations hold
    block_window = 8                   # blocks of a large upstream object asked for at once
    max_object_size = 1052672          # largest object fetched, published or cached (bytes;
                                       # 1 MiB + 4 KiB by default, at most 64 MiB, and 8 MiB
                                       # with cluster)

Every check happens before anything starts; a bad value is a :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from oscar import names
from oscar.objects import DEFAULT_MAX_OBJECT_SIZE
from oscar_io import ports
from oscar_io.blockwise import MAX_WINDOW
from oscar_io.clikit import read_toml
from oscar_io.errors import ConfigError
from oscar_io.urls import redacted, user_part_unclear

__all__ = [
    "CLUSTER_MAX_OBJECT_SIZE",
    "MAX_OBJECT_SIZE",
    "ConfigError",
    "Limits",
    "ProxyConfig",
    "check_cluster_url",
    "load_config",
    "parse_listen",
    "parse_metrics",
    "parse_reverse",
]


#: The most ``limits.max_object_size`` may be: a producer's largest value (64 MiB) and its
#: headers, as the consumer's default limit. An object above 1 MiB is spooled to disk as it
#: arrives, verified as it passes and served from there (:mod:`proxy.large`): the proxy's memory
#: does not grow with it.
MAX_OBJECT_SIZE = (64 << 20) + 4096
#: ... and with ``cluster``: every new object goes whole to every instance in one pub/sub message
#: and sits in the store's memory; Redis's default pub/sub output buffer limit (32 MB hard, 8 MB
#: soft for 60 s) would cut off a subscriber sent much more.
CLUSTER_MAX_OBJECT_SIZE = 8 << 20


@dataclass(frozen=True)
class Limits:
    memory_entries: int = 10_000
    memory_bytes: int = 64 << 20
    disk_entries: int = 100_000
    disk_bytes: int = 1 << 30
    #: Disk the bodies of large objects (above 1 MiB, :mod:`proxy.bodies`) may take, beside
    #: ``disk_bytes``; the least recently used go first.
    large_bytes: int = 1 << 30
    published_max_age: int = 60
    #: Longest freshness any origin's Max-Age may give an entry: bounds how long an origin named
    #: by a forward-proxy client could keep a shared entry from being refreshed.
    max_fresh: int = 300
    upstream_timeout: float = 5.0
    upstream_backoff: float = 5.0
    links_refresh: float = 10.0
    #: Certificate lookups at the AS for kids the proxy does not know, per minute, in all and
    #: per origin (:mod:`proxy.lookups`): junk objects with random kids cannot flood the AS.
    signer_lookups: int = 60
    signer_lookups_per_origin: int = 10
    #: Observe registrations held at once, in all and per client (a DTLS device, a plain-CoAP
    #: IPv4 address or IPv6 /64): beyond them a GET with Observe is answered without Observe
    #: (RFC 7641 §4.1), so a client can hold no more of the proxy's memory (:mod:`proxy.relays`).
    observers: int = 4096
    observers_per_client: int = 128
    #: Upstream observations (relays, one per resource and origin) at once, in all and held by
    #: one client's registrations; a relay goes only toward an origin that served the object.
    relays: int = 1024
    relays_per_client: int = 64
    #: Blocks of a large upstream object asked for at once (:mod:`oscar_io.blockwise`), 1 to 64.
    block_window: int = 8
    #: The largest object fetched from an upstream, published, verified or cached, in bytes:
    #: 1,024 to :data:`MAX_OBJECT_SIZE`, at most :data:`CLUSTER_MAX_OBJECT_SIZE` in a cluster.
    max_object_size: int = DEFAULT_MAX_OBJECT_SIZE

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if type(value) is not int or value < (0 if f.name == "published_max_age" else 1):
                    raise ConfigError(f"limits.{f.name} is a positive whole number")
            elif type(value) not in (int, float) or not 0 < value <= 3600:  # bool is no number
                raise ConfigError(f"limits.{f.name} is 0 to 3600 seconds")
        if self.block_window > MAX_WINDOW:
            raise ConfigError(f"limits.block_window is 1 to {MAX_WINDOW}")
        if not 1024 <= self.max_object_size <= MAX_OBJECT_SIZE:
            raise ConfigError(f"limits.max_object_size is 1024 to {MAX_OBJECT_SIZE} bytes")


@dataclass(frozen=True)
class ProxyConfig:
    bundle: Path
    state: Path
    listen: tuple[str, int]
    reverse: dict[str, str] = field(default_factory=dict)
    plain: bool = True
    dtls: bool = True
    #: Also serve over CoAP over TCP on the listen port (oscar_io.coaptcp): large objects in BERT
    #: blocks; GETs only (a PUT needs the DTLS identity).
    tcp: bool = False
    #: Also serve over CoAP over TLS on the listen port + 1 (TCP), with a certificate the AS
    #: issues at start; clients need one from the AS CA; owners may publish there.
    tls: bool = False
    limits: Limits = field(default_factory=Limits)
    #: The cluster store's URL (:func:`check_cluster_url`); None: a proxy alone (SQLite cache).
    cluster: str | None = None
    #: A file whose first line is the cluster store's password (kept out of the URL, so out of
    #: a world-readable configuration and of ``ps``); read at start (:meth:`cluster_password`).
    cluster_password_file: Path | None = None
    #: Where to serve Prometheus metrics (``metrics = "HOST:PORT"``); None: nowhere.
    metrics: tuple[str, int] | None = None

    def __repr__(self) -> str:
        shown = None if self.cluster is None else redacted(self.cluster)
        return f"ProxyConfig(listen={self.listen!r}, state={str(self.state)!r}, cluster={shown!r})"

    def cluster_password(self) -> str | None:
        """The password in :attr:`cluster_password_file`, if one is named; ConfigError if it
        cannot be read or is empty."""
        path = self.cluster_password_file
        if path is None:
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"cluster_password_file {path}: {why}") from None
        if not lines or not lines[0]:
            raise ConfigError(
                f"cluster_password_file {path}: empty (the password is its first line)"
            )
        return lines[0]

    def __post_init__(self) -> None:
        if self.cluster is not None:
            check_cluster_url(self.cluster)
            if self.limits.max_object_size > CLUSTER_MAX_OBJECT_SIZE:
                raise ConfigError(
                    f"limits.max_object_size is at most {CLUSTER_MAX_OBJECT_SIZE} bytes with "
                    "cluster (each new object goes whole to every instance through the store)"
                )
        elif self.cluster_password_file is not None:
            raise ConfigError("cluster_password_file without cluster")
        for flag in ("tcp", "tls"):
            if type(getattr(self, flag)) is not bool:
                raise ConfigError(f"{flag} is true or false")
        if not (self.plain or self.dtls or self.tcp or self.tls):
            raise ConfigError("plain, dtls, tcp and tls are all off: nothing to listen on")
        if self.dtls and _unspecified(self.listen[0]):
            # aiocoap's DTLS server cannot bind a wildcard address (ValueError at start).
            raise ConfigError(
                f"listen {self.listen[0]}: DTLS needs one address (not a wildcard); "
                "name it, or turn DTLS off"
            )
        for prefix, uri in self.reverse.items():
            parse_reverse(f"{prefix}={uri}")


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


#: What a cluster URL's query may set (redis-py's names): TLS files and checks, timeouts.
CLUSTER_URL_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "socket_timeout",
        "socket_connect_timeout",
    }
)
_CLUSTER_SHAPE = (
    "a cluster URL is redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS, "
    "unix:///PATH for a socket), with / ? # @ : in a password percent-encoded"
)


def check_cluster_url(url: object) -> str:
    """``url`` if it names a Redis-protocol store: ``redis://``, ``rediss://`` (TLS) or
    ``unix://``, a host (or path), a port in range, a database number, only the query options
    of :data:`CLUSTER_URL_OPTIONS`; :class:`ConfigError` (the URL redacted) otherwise."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"cluster: {_CLUSTER_SHAPE}")
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:  # its text may quote a password that looked like a port
        raise ConfigError(f"cluster {shown}: {_CLUSTER_SHAPE}") from None
    if parts.scheme not in ("redis", "rediss", "unix") or user_part_unclear(url):
        raise ConfigError(f"cluster {shown}: {_CLUSTER_SHAPE}")
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ConfigError(f"cluster {shown}: unix:///PATH names the socket")
    elif not parts.hostname:
        raise ConfigError(f"cluster {shown}: no host")
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"cluster {shown}: the database is a number (/0 to /15)")
    if parts.fragment:
        raise ConfigError(f"cluster {shown}: {_CLUSTER_SHAPE}")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "db" and value.isdigit() and parts.scheme == "unix":
            continue
        if name not in CLUSTER_URL_OPTIONS:
            raise ConfigError(f"cluster {shown}: unknown option {name!r}")
        if name.startswith("socket_"):
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds <= 60:
                raise ConfigError(f"cluster {shown}: {name} is 0 to 60 seconds")
    return url


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` of the plain CoAP port, at most 65534 since DTLS takes
    the next port (:func:`oscar_io.ports.parse_listen`); :class:`ConfigError` otherwise."""
    try:
        return ports.parse_listen(text, highest=65534)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_metrics(text: object, where: str = "metrics") -> tuple[str, int]:
    """``metrics = "HOST:PORT"`` (``--metrics``): where Prometheus scrapes the proxy."""
    if not isinstance(text, str):
        raise ConfigError(f'{where}: metrics is "HOST:PORT"')
    try:
        return ports.parse_listen(text)
    except ValueError as exc:
        raise ConfigError(f"metrics: {exc}") from None


def parse_reverse(text: str) -> tuple[str, str]:
    """``PREFIX=coap://HOST:PORT``: requests for /PREFIX/REST go to coap://HOST:PORT/PREFIX/REST."""
    prefix, sep, uri = text.partition("=")
    prefix = prefix.strip("/")
    if (
        not sep
        or not prefix
        or not all(names.is_resource_id(f"x/{segment}") for segment in prefix.split("/"))
    ):
        raise ConfigError(f"reverse {text!r}: PREFIX=coap://HOST:PORT expected")
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:  # a malformed IPv6 literal or port (found by fuzzing)
        raise ConfigError(f"reverse {text!r}: the target is coap://HOST[:PORT]") from None
    if parts.scheme != "coap" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"reverse {text!r}: the target is coap://HOST[:PORT]")
    return prefix, uri.rstrip("/")


def load_config(path: Path, **overrides: Any) -> ProxyConfig:
    """Read a TOML file; ``overrides`` that are not None replace its values."""
    doc = read_toml(path, ConfigError)
    return config_from_mapping(doc, base=path.parent, where=str(path), **overrides)


def config_from_mapping(
    doc: dict[str, Any], *, base: Path, where: str = "config", **overrides: Any
) -> ProxyConfig:
    known = {
        "bundle",
        "state",
        "listen",
        "reverse",
        "plain",
        "dtls",
        "tcp",
        "tls",
        "limits",
        "cluster",
        "cluster_password_file",
        "metrics",
    }
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")

    def resolve(value: object, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {what} is a path (text)")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else base / p

    values: dict[str, Any] = {}
    if "bundle" in doc:
        values["bundle"] = resolve(doc["bundle"], "bundle")
    if "state" in doc:
        values["state"] = resolve(doc["state"], "state")
    if "listen" in doc:
        if not isinstance(doc["listen"], str):
            raise ConfigError(f'{where}: listen is "HOST:PORT"')
        values["listen"] = parse_listen(doc["listen"])
    for flag in ("plain", "dtls", "tcp", "tls"):
        if flag in doc:
            if not isinstance(doc[flag], bool):
                raise ConfigError(f"{where}: {flag} is true or false")
            values[flag] = doc[flag]
    if "cluster" in doc:
        values["cluster"] = check_cluster_url(doc["cluster"])
    if "cluster_password_file" in doc:
        values["cluster_password_file"] = resolve(
            doc["cluster_password_file"], "cluster_password_file"
        )
    if "metrics" in doc:
        values["metrics"] = parse_metrics(doc["metrics"], where)
    reverse = doc.get("reverse", {})
    if not isinstance(reverse, dict) or not all(isinstance(v, str) for v in reverse.values()):
        raise ConfigError(f'{where}: [reverse] maps "PREFIX" = "coap://HOST:PORT"')
    values["reverse"] = dict(parse_reverse(f"{k}={v}") for k, v in reverse.items())
    limits = doc.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"{where}: [limits] is a table")
    bad = set(limits) - {f.name for f in fields(Limits)}
    if bad:
        raise ConfigError(f"{where}: unknown limit(s) {', '.join(sorted(bad))}")
    values["limits"] = Limits(**limits)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "reverse":
            values["reverse"] = {**values["reverse"], **value}
        else:
            values[key] = value
    missing = [k for k in ("bundle", "state", "listen") if k not in values]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} required")
    return ProxyConfig(**values)
