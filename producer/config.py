"""The producer's configuration: resources, where their values come from, and where objects go.

From code::

    ProducerConfig(bundle=Path("sensor-1.json"), state=Path("state"), listen=("127.0.0.1", 5683),
                   resources=[ResourceSpec("temperature", file=Path("/run/temp.txt"))])

or from a TOML file (:func:`load_config`; relative paths are relative to the file)::

    bundle = "sensor-1.json"
    state = "/var/lib/oscar/producer"
    listen = "127.0.0.1:5683"          # leave out to serve nothing (a producer that only publishes)
    tcp = false                        # also CoAP over TCP (RFC 8323) on the listen port
    tls = false                        # also CoAP over TLS on the listen port + 1 (mutual, AS CA)
    key_algorithm = "ES256"            # or "EdDSA" (for the *-eddsa profiles)
    max_observers = 256                # Observe registrations held at once, in all
    max_observers_per_address = 16     # ... and from one IP address
    multicast = ["224.0.1.187:5683"]   # each new object once to each group; group GETs answered
    multicast_interface = "127.0.0.1"  # IPv4 groups joined and sent on (default 0.0.0.0: any)
    multicast_interface6 = "eth0"      # IPv6 groups: an interface name or one of its addresses
    multicast_hops = 1                 # TTL / hop limit of group datagrams
    multicast_leisure = 1.0            # answers to a group GET wait 0 to this many seconds

    [[resource]]
    path = "temperature"               # the resource is <producer id>/temperature
    file = "/run/temp.txt"             # or command = ["read-sensor"]; or neither: set by code
    interval = 1.0                     # seconds between looks at the file / runs of the command
    content_format = 0                 # the representation's own CoAP content format
    max_age = 60                       # CoAP Max-Age of a response, seconds
    lifetime = 3600                    # exp - iat of each object; re-sealed when half of it is gone
    profile = "ccm-es256"              # see oscar.profiles
    rotation_period = 3600             # seconds per epoch; 0 = only on revocation

    [[resource]]                       # a multi-part resource (issue 19): no file/command of its
    path = "vitals"                    # own; one object of every part, sealed once per change
    [[resource.part]]
    name = "summary"                   # as oscar.parts.is_part_name; unique; 1 to 16 parts
    kind = "plain"                     # signed, readable by anyone
    file = "/run/summary.txt"          # or none: set by code (Producer.update_parts)
    [[resource.part]]
    name = "measurements"
    kind = "encrypted"                 # its own secret (at least one part is encrypted)
    file = "/run/measurements.json"
    content_format = 50                # default: guessed from the file name, else 0

    [[publish]]                        # PUT every new object to <uri>/<resource id>
    uri = "coaps://proxy.example:5684"
    proxy = "cloud-1"                  # an OSCAR proxy's device id: the DTLS link PSK from the AS
    # or, for another DTLS target: psk_identity = "..." and psk_hex = "..."

Every check happens here, before anything starts: a bad value is a :class:`ConfigError` naming
the field, and nothing is written to the state directory.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from oscar import names
from oscar.parts import MAX_PARTS, is_part_name
from oscar.profiles import DEFAULT_PROFILE, PROFILES
from oscar_io import ports
from oscar_io.multicast import ANY_INTERFACE, Group

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "PartSpec",
    "ProducerConfig",
    "PublishTarget",
    "ResourceSpec",
    "Value",
    "guess_content_format",
    "load_config",
    "parse_listen",
]

#: A value source given in code: returns the representation (or None for "no change"), maybe async.
Value = Callable[[], "bytes | Awaitable[bytes | None] | None"]

MAX_PERIOD = 0xFFFF_FFFF
#: The largest plaintext a producer seals: 64 MiB, a consumer's default limit less the headers
#: (consumer.client.DEFAULT_MAX_OBJECT_SIZE); one over 1 MiB needs consumers and proxies that
#: take it (a proxy's limits.max_object_size is 1 MiB + 4 KiB unless raised). Sealed in memory.
MAX_VALUE_SIZE = 64 << 20
#: The most observers a configuration may allow (about 600 MiB of aiocoap state).
MAX_OBSERVERS = 65_536

_EXTENSIONS = {
    ".txt": 0,
    ".text": 0,
    ".csv": 0,
    ".xml": 41,
    ".json": 50,
    ".cbor": 60,
    ".senml": 110,
}


def guess_content_format(path: Path) -> int:
    """CoAP content format from a file name: text, XML, JSON, CBOR, else octet-stream (42)."""
    return _EXTENSIONS.get(path.suffix.lower(), 42)


#: The kinds of a part (the AS wire's words).
PART_KINDS = ("plain", "encrypted")


@dataclass(frozen=True)
class PartSpec:
    """One part of a multi-part resource: its name, kind, value source (a file, or set by code)
    and the content format of its own representation."""

    name: str
    kind: str = "encrypted"
    file: Path | None = None
    content_format: int = 0

    def __post_init__(self) -> None:
        if not is_part_name(self.name):
            raise ConfigError(
                f"part {self.name!r}: a part name is 1 to 32 characters of A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        if self.kind not in PART_KINDS:
            raise ConfigError(f"part {self.name!r}: kind is plain or encrypted")
        if self.file is not None and not isinstance(self.file, Path):
            raise ConfigError(f"part {self.name!r}: file is a path")
        _uint(self.content_format, 0xFFFF, f"part {self.name!r}: content_format")


@dataclass(frozen=True)
class ResourceSpec:
    """One protected resource: its path under the producer id, value source and parameters."""

    path: str
    file: Path | None = None
    command: tuple[str, ...] | None = None
    callback: Value | None = field(default=None, compare=False)
    interval: float = 1.0
    content_format: int = 0
    max_age: int = 60
    lifetime: int = 3600
    profile: str = DEFAULT_PROFILE.name
    rotation_period: int = 3600
    #: A multi-part resource's parts, in order (issue 19); empty: a single-part resource.
    parts: tuple[PartSpec, ...] = ()

    def __post_init__(self) -> None:
        where = f"resource {self.path!r}"
        if not isinstance(self.path, str) or not names.is_resource_id(f"p/{self.path}"):
            raise ConfigError(
                f"{where}: a path is '/'-separated segments of A-Z a-z 0-9 . _ ~ - "
                "(none empty, '.' or '..'; at most 255 characters with the producer id)"
            )
        sources = [s for s in (self.file, self.command, self.callback) if s is not None]
        if len(sources) > 1:
            raise ConfigError(f"{where}: give at most one of file, command, callback")
        if self.command is not None and (
            not self.command or not all(isinstance(a, str) and a for a in self.command)
        ):
            raise ConfigError(f"{where}: command is a non-empty list of strings")
        if not isinstance(self.interval, (int, float)) or not 0.05 <= self.interval <= 86_400:
            raise ConfigError(f"{where}: interval is 0.05 to 86400 seconds")
        _uint(self.content_format, 0xFFFF, f"{where}: content_format")
        _uint(self.max_age, MAX_PERIOD, f"{where}: max_age")
        _uint(self.lifetime, MAX_PERIOD, f"{where}: lifetime")
        _uint(self.rotation_period, MAX_PERIOD, f"{where}: rotation_period")
        if self.lifetime < 2 or self.lifetime < self.max_age:
            raise ConfigError(f"{where}: lifetime must be at least 2 s and at least max_age")
        if self.profile not in PROFILES:
            raise ConfigError(f"{where}: unknown profile; choose one of {', '.join(PROFILES)}")
        if self.parts:
            self._check_parts(where)

    def _check_parts(self, where: str) -> None:
        parts = self.parts
        if not isinstance(parts, tuple) or not all(isinstance(p, PartSpec) for p in parts):
            raise ConfigError(f"{where}: parts is a tuple of PartSpec")
        if len(parts) > MAX_PARTS:
            raise ConfigError(f"{where}: at most {MAX_PARTS} parts")
        names_seen = [p.name for p in parts]
        if len(set(names_seen)) != len(names_seen):
            raise ConfigError(f"{where}: two parts have the same name")
        if not any(p.kind == "encrypted" for p in parts):
            raise ConfigError(f"{where}: at least one part must be encrypted")
        if self.file is not None or self.command is not None or self.callback is not None:
            raise ConfigError(
                f"{where}: a resource with parts takes its values per part (part file, or code)"
            )


@dataclass(frozen=True, repr=False)
class PublishTarget:
    """A proxy that takes PUTs of new objects at ``<uri>/<resource id>``."""

    uri: str
    psk_identity: str | None = None
    psk: bytes | None = field(default=None, repr=False)
    #: The device id of an OSCAR proxy: the DTLS link PSK for it comes from the AS.
    proxy: str | None = None

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.uri)
            _ = parts.port  # raises ValueError for a port out of range
        except ValueError:  # a malformed IPv6 literal or port (found by fuzzing)
            parts = urlsplit("")
        if parts.scheme not in ("coap", "coaps") or not parts.hostname or parts.query:
            raise ConfigError(f"publish uri {self.uri!r}: coap://HOST[:PORT][/PREFIX] expected")
        if self.proxy is not None and not names.is_device_id(self.proxy):
            raise ConfigError(f"publish uri {self.uri!r}: proxy is a device id")
        if (
            parts.scheme == "coaps"
            and self.proxy is None
            and (not self.psk_identity or not self.psk)
        ):
            raise ConfigError(
                f"publish uri {self.uri!r}: coaps needs proxy (an OSCAR proxy's id) "
                "or psk_identity and psk_hex"
            )
        if self.psk is not None and not 1 <= len(self.psk) <= 16:
            raise ConfigError(f"publish uri {self.uri!r}: a DTLS PSK is 1 to 16 bytes")

    def __repr__(self) -> str:
        return f"PublishTarget({self.uri!r})"

    @classmethod
    def parse(cls, text: str) -> PublishTarget:
        """``[PROXY_ID=]URI`` (the command line's form)."""
        proxy, sep, uri = text.partition("=")
        if sep and "://" not in proxy:
            return cls(uri, proxy=proxy)
        return cls(text)

    def resource_uri(self, resource_id: str) -> str:
        return f"{self.uri.rstrip('/')}/{resource_id}"


@dataclass(frozen=True)
class ProducerConfig:
    """Everything a producer needs to start."""

    bundle: Path
    state: Path
    listen: tuple[str, int] | None = None
    resources: Sequence[ResourceSpec] = ()
    publish: Sequence[PublishTarget] = ()
    key_algorithm: str = "ES256"
    #: Sequence numbers reserved per write of the state (DESIGN §4): fewer writes, more skipped.
    sequence_window: int = 64
    #: Seconds to wait for the AS per request.
    as_timeout: float = 10.0
    #: Observe registrations held at once, in all and from one IP address (each costs about
    #: 9 KiB; see producer.observers). 0 serves no observers.
    max_observers: int = 256
    max_observers_per_address: int = 16
    #: Where to serve Prometheus metrics (``metrics = "HOST:PORT"``), None: nowhere; and
    #: whether resource ids label the per-resource families (``metrics_per_resource``).
    metrics: tuple[str, int] | None = None
    metrics_per_resource: bool = False
    #: Also serve over CoAP over TCP on the listen port (large objects in BERT blocks).
    tcp: bool = False
    #: Also serve over CoAP over TLS on the listen port + 1: the producer's certificate from the
    #: AS CA, clients must present one from the same CA (oscar_io.coaptcp).
    tls: bool = False
    #: Multicast groups every new object goes to, once each (producer.groups); group GETs to
    #: them are answered. Per producer, not per resource: a CoAP group is a group of endpoints
    #: (RFC 7390), and a group GET names a resource of each of them.
    multicast: Sequence[Group] = ()
    multicast_interface: str = ANY_INTERFACE
    multicast_interface6: str | None = None
    multicast_hops: int = 1
    multicast_leisure: float = 1.0

    def __post_init__(self) -> None:
        if self.key_algorithm not in ("ES256", "EdDSA"):
            raise ConfigError("key_algorithm is ES256 or EdDSA")
        seen: set[str] = set()
        for spec in self.resources:
            if spec.path in seen:
                raise ConfigError(f"resource {spec.path!r} is configured twice")
            seen.add(spec.path)
            signs_with = PROFILES[spec.profile].signature.name
            if signs_with != self.key_algorithm:
                raise ConfigError(
                    f"resource {spec.path!r}: profile {spec.profile} signs with {signs_with}, "
                    f"but the producer key is {self.key_algorithm} (set key_algorithm)"
                )
        if self.listen is None and not self.publish and not self.multicast:
            raise ConfigError("nothing to do: give listen, publish, multicast, or several")
        if type(self.sequence_window) is not int or not 1 <= self.sequence_window <= 1 << 20:
            raise ConfigError("sequence_window is 1 to 1048576")
        for key in ("tcp", "tls"):
            value = getattr(self, key)
            if type(value) is not bool:
                raise ConfigError(f"{key} is true or false")
            if value and self.listen is None:
                raise ConfigError(f"{key} = true needs listen (the TCP port is the listen port)")
        if self.tls and self.listen is not None and self.listen[1] >= 65535:
            raise ConfigError("tls = true needs a listen port below 65535 (TLS takes port + 1)")
        _uint(self.max_observers, MAX_OBSERVERS, "max_observers")
        _uint(self.max_observers_per_address, MAX_OBSERVERS, "max_observers_per_address")
        self._check_multicast()

    def _check_multicast(self) -> None:
        if not all(isinstance(group, Group) for group in self.multicast):
            raise ConfigError("multicast is a list of groups")
        if len(set(self.multicast)) != len(self.multicast):
            raise ConfigError("multicast: a group is listed twice")
        if any(":" in g.address for g in self.multicast) and not self.multicast_interface6:
            raise ConfigError("multicast: an IPv6 group needs multicast_interface6")
        try:
            ipaddress.IPv4Address(str(self.multicast_interface))
            if not isinstance(self.multicast_interface, str):
                raise ValueError
        except ValueError:
            raise ConfigError("multicast_interface is an IPv4 address") from None
        if self.multicast_interface6 is not None and (
            not isinstance(self.multicast_interface6, str) or not self.multicast_interface6
        ):
            raise ConfigError("multicast_interface6 is an interface name or IPv6 address")
        if type(self.multicast_hops) is not int or not 1 <= self.multicast_hops <= 255:
            raise ConfigError("multicast_hops is 1 to 255")
        leisure = self.multicast_leisure
        if not isinstance(leisure, (int, float)) or isinstance(leisure, bool):
            raise ConfigError("multicast_leisure is 0 to 60 seconds")
        if not 0 <= leisure <= 60:
            raise ConfigError("multicast_leisure is 0 to 60 seconds")


def parse_listen(text: str, *, what: str = "") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``, the port 1 to 65535, into (host, port)
    (:func:`oscar_io.ports.parse_listen`); :class:`ConfigError` otherwise (its message starting
    with ``what:`` if given)."""
    try:
        return ports.parse_listen(text, lowest=1, highest=65535)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}" if what else str(exc)) from None


def _uint(value: object, maximum: int, what: str) -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise ConfigError(f"{what} is a whole number from 0 to {maximum}")


_TOP = {
    "bundle",
    "state",
    "listen",
    "resource",
    "publish",
    "key_algorithm",
    "sequence_window",
    "max_observers",
    "max_observers_per_address",
    "metrics",
    "metrics_per_resource",
    "tcp",
    "tls",
    "multicast",
    "multicast_interface",
    "multicast_interface6",
    "multicast_hops",
    "multicast_leisure",
}
_RESOURCE = {
    "path",
    "file",
    "command",
    "interval",
    "content_format",
    "max_age",
    "lifetime",
    "profile",
    "rotation_period",
    "part",
}
_PART = {"name", "kind", "file", "content_format"}
_PUBLISH = {"uri", "psk_identity", "psk_hex", "proxy"}


def load_config(path: Path, **overrides: Any) -> ProducerConfig:
    """Read a TOML configuration; ``overrides`` (not None) replace its top-level values."""
    from oscar_io.clikit import read_toml  # the CLI kit only when a file is read (embedding: never)

    doc = read_toml(path, ConfigError)
    publish = doc.get("publish")
    if (
        isinstance(publish, list)
        and any(isinstance(t, dict) and "psk_hex" in t for t in publish)
        and os.stat(path).st_mode & 0o077
    ):
        raise ConfigError(f"{path} holds a psk_hex and others may read it: chmod 600 it")
    return config_from_mapping(doc, base=path.parent, where=str(path), **overrides)


def config_from_mapping(
    doc: dict[str, Any], *, base: Path, where: str = "config", **overrides: Any
) -> ProducerConfig:
    """Build a :class:`ProducerConfig` from decoded TOML; unknown keys are errors (typos)."""
    unknown = set(doc) - _TOP
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")

    def resolve(value: object, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {what} is a path (text)")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else base / p

    resources = []
    for i, item in enumerate(_tables(doc.get("resource", []), f"{where}: [[resource]]")):
        bad = set(item) - _RESOURCE
        if bad:
            raise ConfigError(f"{where}: resource {i + 1}: unknown key(s) {', '.join(sorted(bad))}")
        args = {k: v for k, v in item.items() if k not in ("file", "command", "part")}
        if "part" in item:
            args["parts"] = tuple(
                _part(p, f"{where}: resource {i + 1} part {j + 1}", resolve)
                for j, p in enumerate(_tables(item["part"], f"{where}: [[resource.part]]"))
            )
        if "file" in item:
            args["file"] = resolve(item["file"], f"resource {i + 1} file")
        if "command" in item:
            command = item["command"]
            if isinstance(command, str) or not isinstance(command, list):
                raise ConfigError(f"{where}: resource {i + 1}: command is a list of strings")
            args["command"] = tuple(command)
        if "path" not in args:
            raise ConfigError(f"{where}: resource {i + 1} needs a path")
        try:
            resources.append(ResourceSpec(**args))
        except TypeError as exc:
            raise ConfigError(f"{where}: resource {i + 1}: {exc}") from None
    publish = []
    for i, item in enumerate(_tables(doc.get("publish", []), f"{where}: [[publish]]")):
        bad = set(item) - _PUBLISH
        if bad or "uri" not in item:
            raise ConfigError(
                f"{where}: publish {i + 1}: keys are uri, proxy, psk_identity, psk_hex"
            )
        psk = None
        if "psk_hex" in item:
            try:
                psk = bytes.fromhex(str(item["psk_hex"]))
            except ValueError:
                raise ConfigError(f"{where}: publish {i + 1}: psk_hex is not hex") from None
        publish.append(
            PublishTarget(str(item["uri"]), item.get("psk_identity"), psk, item.get("proxy"))
        )

    values: dict[str, Any] = {
        "bundle": resolve(doc["bundle"], "bundle") if "bundle" in doc else None,
        "state": resolve(doc["state"], "state") if "state" in doc else None,
        "listen": parse_listen(doc["listen"]) if isinstance(doc.get("listen"), str) else None,
        "resources": resources,
        "publish": publish,
    }
    if "listen" in doc and not isinstance(doc["listen"], str):
        raise ConfigError(f'{where}: listen is "HOST:PORT"')
    if "metrics" in doc:
        if not isinstance(doc["metrics"], str):
            raise ConfigError(f'{where}: metrics is "HOST:PORT"')
        values["metrics"] = parse_listen(doc["metrics"], what="metrics")
    if "metrics_per_resource" in doc:
        if not isinstance(doc["metrics_per_resource"], bool):
            raise ConfigError(f"{where}: metrics_per_resource is true or false")
        values["metrics_per_resource"] = doc["metrics_per_resource"]
    if "multicast" in doc:
        groups = doc["multicast"]
        if not isinstance(groups, list):
            raise ConfigError(f'{where}: multicast is a list of "ADDRESS:PORT"')
        values["multicast"] = [Group.parse(text) for text in groups]
    for key in (
        "key_algorithm",
        "sequence_window",
        "max_observers",
        "max_observers_per_address",
        "tcp",
        "tls",
        "multicast_interface",
        "multicast_interface6",
        "multicast_hops",
        "multicast_leisure",
    ):
        if key in doc:
            values[key] = doc[key]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("resources", "publish", "multicast"):  # the flags' add to the file's
            values[key] = [*values.get(key, ()), *value]
        else:
            values[key] = value
    if values["bundle"] is None or values["state"] is None:
        raise ConfigError(f"{where}: bundle and state are required")
    return ProducerConfig(**values)


def _part(item: dict[str, Any], where: str, resolve: Callable[[object, str], Path]) -> PartSpec:
    bad = set(item) - _PART
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
    if "name" not in item:
        raise ConfigError(f"{where}: needs a name")
    file = resolve(item["file"], f"{where} file") if "file" in item else None
    default_format = 0 if file is None else guess_content_format(file)
    try:
        return PartSpec(
            item["name"],
            item.get("kind", "encrypted"),
            file,
            item.get("content_format", default_format),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _tables(value: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{what} must be an array of tables")
    return value
