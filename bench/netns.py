"""A private network namespace with multicast, for the benchmark and tests that use groups.

:func:`multicast_namespace` makes a uniquely named namespace (``ip netns add``), switches
multicast on its loopback with a ``224.0.0.0/4`` route (IPv4 groups on ``127.0.0.1``), adds a
veth pair ``mc0``/``mc1`` with addresses ``fd00:6f73::1`` and ``::2`` and ``10.213.0.1/30`` on
``mc0`` (for ``AI_ADDRCONFIG``; IPv6 multicast does not
work on ``lo``: joined sockets there receive nothing, with or without an ``ff00::/8`` route; on
a veth interface it does), moves the calling thread into it (``setns``) for the ``with`` block,
so that the sockets the test makes there, and the processes it starts meanwhile, live in the
namespace, then moves the thread back and deletes the namespace, also on failure. The host's
own interfaces are never touched.

Needs root and ``ip`` (iproute2); :func:`available` says whether they are there. A namespace left
behind by a test process killed with -9 is deleted by the next one (its name holds the pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
PREFIX = "oscar-mc-"
IPV4_INTERFACE = "127.0.0.1"
IPV6_INTERFACE = "fd00:6f73::1"
IPV6_OTHER = "fd00:6f73::2"


@dataclass(frozen=True)
class Namespace:
    name: str
    inode: int

    def current(self) -> bool:
        """Whether the calling thread is in this namespace now."""
        return os.stat("/proc/thread-self/ns/net").st_ino == self.inode


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _remove_orphans() -> None:
    run = Path("/run/netns")
    if not run.is_dir():
        return
    for entry in run.iterdir():
        if not entry.name.startswith(PREFIX):
            continue
        pid = entry.name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", entry.name)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def multicast_namespace() -> Iterator[Namespace]:
    """The calling thread in a fresh namespace with multicast (module docstring)."""
    _remove_orphans()
    name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "set", "lo", "multicast", "on"),
            ("route", "add", "224.0.0.0/4", "dev", "lo"),
            ("link", "add", "mc0", "type", "veth", "peer", "name", "mc1"),
            ("link", "set", "mc0", "up"),
            ("link", "set", "mc1", "up"),
            ("-6", "addr", "add", f"{IPV6_INTERFACE}/64", "dev", "mc0", "nodad"),
            ("-6", "addr", "add", f"{IPV6_OTHER}/64", "dev", "mc1", "nodad"),
            # An IPv4 address beside loopback's: getaddrinfo's AI_ADDRCONFIG (aiocoap's udp6
            # resolves 127.0.0.1 with it) finds no IPv4 at all in a namespace with only lo.
            ("addr", "add", "10.213.0.1/30", "dev", "mc0"),
        ):
            _ip("-n", name, *args)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            namespace = Namespace(name, os.fstat(target).st_ino)
            _setns(target)
        finally:
            os.close(target)
        try:
            if not namespace.current():
                raise RuntimeError("setns did not move the thread into the namespace")
            yield namespace
        finally:
            _setns(original)
    finally:
        os.close(original)
        _ip("netns", "del", name)
