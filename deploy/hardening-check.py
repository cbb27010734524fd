#!/usr/bin/env python3
"""Run a command under roughly the restrictions the units in deploy/systemd/ impose, without
systemd: how the hardening in docs/DEPLOY.md was checked.

    python3 deploy/hardening-check.py .venv/bin/python -m pytest tests/system/test_end_to_end.py

Applied to the command and everything it starts (all three are inherited across fork and exec):

- NoNewPrivileges=yes: prctl(PR_SET_NO_NEW_PRIVS);
- MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own
  version of the same rule (Linux 6.3 or later): no mapping both writable and executable, none
  made executable later;
- RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6: a seccomp filter that fails socket(2) for
  any other family with EAFNOSUPPORT, as systemd does.

It does not imitate the file-system protections or SystemCallFilter=. x86_64 only (the seccomp
filter checks the architecture and the x86_64 number of socket(2); elsewhere it lets everything
through). Not part of the product: a check for operators and reviewers.
"""

import ctypes
import os
import sys

PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE = 22, 38, 65
SECCOMP_MODE_FILTER, PR_MDWE_REFUSE_EXEC_GAIN = 2, 1
AUDIT_ARCH_X86_64, NR_SOCKET_X86_64 = 0xC000003E, 41
AF_UNIX, AF_INET, AF_INET6, EAFNOSUPPORT = 1, 2, 10, 97
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | EAFNOSUPPORT  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


# struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low 32 bits, little-endian).
PROGRAM = [
    SockFilter(LD_W_ABS, 0, 0, 4),
    SockFilter(JEQ_K, 0, 7, AUDIT_ARCH_X86_64),  # another architecture: allow (see docstring)
    SockFilter(LD_W_ABS, 0, 0, 0),
    SockFilter(JEQ_K, 0, 5, NR_SOCKET_X86_64),  # not socket(2): allow
    SockFilter(LD_W_ABS, 0, 0, 16),
    SockFilter(JEQ_K, 3, 0, AF_UNIX),
    SockFilter(JEQ_K, 2, 0, AF_INET),
    SockFilter(JEQ_K, 1, 0, AF_INET6),
    SockFilter(RET_K, 0, 0, DENY),
    SockFilter(RET_K, 0, 0, ALLOW),
]


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: hardening-check.py COMMAND [ARG ...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(what: str, *args: object) -> None:
        if libc.prctl(*args) != 0:
            sys.exit(f"hardening-check: {what}: {os.strerror(ctypes.get_errno())}")

    program = (SockFilter * len(PROGRAM))(*PROGRAM)
    fprog = SockFprog(len(PROGRAM), program)
    prctl("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    prctl("PR_SET_MDWE (Linux 6.3 or later)", PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
    prctl("seccomp", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 -- running the command is the point
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
