"""The admin console's TLS: a server certificate issued by the AS CA at each start, its key in
memory only.

:func:`server_context` asks the CA (:meth:`authz_server.ca.CertificateAuthority
.issue_server_certificate`) for a certificate naming the address the console binds (and
``localhost`` beside a loopback address), and loads it with its fresh key into an
:class:`ssl.SSLContext` (TLS 1.2 at least). Python's ``ssl`` loads keys from files only: the key
goes through an anonymous memory file (``memfd_create``, Linux), closed as soon as it is loaded,
so it never reaches a file system and dies with the process. Browsers that trust the AS CA
(``ca.pem`` in the state directory) trust the console; the certificate changes at every start.

What it does not do: serve anything (:mod:`.app` does), or keep the key anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import ssl

from ..ca import CertificateAuthority

__all__ = ["certificate_hosts", "server_context"]


def certificate_hosts(host: str) -> list[str]:
    """The names the console's certificate holds for the bound ``host``: it, and for a loopback
    address ``localhost`` too (browsers may be pointed at either)."""
    hosts = [host]
    try:
        if ipaddress.ip_address(host).is_loopback:
            hosts.append("localhost")
    except ValueError:
        if host == "localhost":
            hosts.append("127.0.0.1")
    return hosts


def _memory_file(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def server_context(ca: CertificateAuthority, host: str, now: int) -> tuple[ssl.SSLContext, bytes]:
    """A TLS server context for the console on ``host``, and its certificate chain (PEM)."""
    chain, key = ca.issue_server_certificate(certificate_hosts(host), now)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert_fd = _memory_file("oscar-console-cert", chain)
    try:
        key_fd = _memory_file("oscar-console-key", key)
        try:
            context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)
    del key
    return context, chain
