"""Live counters for ``oscar-proxy stats``: a Unix socket in the proxy's state directory.

The running proxy listens on ``STATE/stats.sock`` (mode 0600 in the 0700 state directory: only
the proxy's user can connect). Each connection gets the counters as they are at that moment, one
JSON object and a newline, and is closed; nothing is read from the client. So ``oscar-proxy stats``
shows live counts, with DTLS only as well as with plain CoAP, and nothing is written to the disk
every second.

A socket file left by a proxy that was killed is replaced at start; a proxy that still answers on
it means that another one uses the same state directory, and the start is refused (both would
write one cache). A long state path (beyond the 107 bytes a socket address holds) is reached
through ``/proc/self/fd`` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from oscar_io.errors import StateError

__all__ = [
    "SOCKET",
    "StatsUnavailable",
    "close_stats",
    "ensure_state_free",
    "read_stats",
    "serve_stats",
]

SOCKET = "stats.sock"
_MAX_PATH = 100


class StatsUnavailable(Exception):
    """No running proxy answered on the state directory's socket; the message says why."""


@contextlib.contextmanager
def _address(state: Path) -> Iterator[str]:
    """The socket's address: its path, or one through /proc/self/fd if that is too long."""
    path = str(state / SOCKET)
    if len(os.fsencode(path)) <= _MAX_PATH:
        yield path
        return
    fd = os.open(state, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET}"
    finally:
        os.close(fd)


def _connect(address: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def ensure_state_free(state: Path) -> None:
    """Remove a socket file left by a proxy that is gone; StateError if one still answers on it
    or if something else has the name."""
    path = state / SOCKET
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StateError(f"{path} is not a socket; move it away")
    with _address(state) as address:
        try:
            _connect(address, 2.0).close()
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise StateError(f"{path}: {exc.strerror or exc}") from None
    raise StateError(f"another oscar-proxy uses {state} (it answers on {path})")


async def serve_stats(state: Path, counters: Callable[[], dict[str, int]]) -> asyncio.Server:
    """Listen on the state directory's socket; each connection gets ``counters()``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(counters()).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    ensure_state_free(state)
    with _address(state) as address:
        server = await asyncio.start_unix_server(answer, path=address)
        os.chmod(address, 0o600)
    return server


def close_stats(state: Path, server: asyncio.Server | None) -> None:
    """Stop answering and remove the socket file."""
    if server is not None:
        server.close()
        with contextlib.suppress(OSError):
            (state / SOCKET).unlink()


def read_stats(state: Path, timeout: float = 5.0) -> dict[str, int]:
    """The running proxy's counters, as they are now; :class:`StatsUnavailable` if none answers."""
    path = state / SOCKET
    try:
        with _address(state) as address, _connect(address, timeout) as sock:
            data = b""
            while len(data) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise StatsUnavailable(f"no {path}: is a proxy running with --state {state}?") from None
    except ConnectionRefusedError:
        raise StatsUnavailable(f"no proxy answers on {path} (left by one that stopped?)") from None
    except TimeoutError:
        raise StatsUnavailable(f"the proxy did not answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise StatsUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except ValueError:
        raise StatsUnavailable(f"{path} gave no counters") from None
    if not isinstance(doc, dict):
        raise StatsUnavailable(f"{path} gave no counters")
    return doc
