"""State directories and the files in them, against another local user (issue 13, finding 2).

Every role (AS, producer, consumer, proxy) opens its state directory through
``oscar_io.asclient.private_dir``: one of another user's, one reached through a symbolic link,
and one holding another user's file or a symbolic link is refused with one line and left as it
was; one of its own with a wider mode than 0700 is repaired. ``atomic_write`` makes its temporary
file exclusively under a random name, so names planted beforehand receive nothing and redirect
nothing; state files are never read through a symbolic link.

"Another user" is uid 65534 (nobody): files are chowned to it, and the attacker's own steps run
as it (``setpriv``). Those tests need root and say so when skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from as_harness import make_state
from cryptography.hazmat.primitives import serialization

from demo.system import free_port
from oscar import certs
from oscar_io.errors import StateError
from oscar_io.statefiles import SealedFile, atomic_write, private_dir, read_state_file

OTHER = 65534  # nobody
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="acting as a second user (uid 65534) needs root"
)


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the second user can reach (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="oscar-statedirs-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


#: A stand-in for a PEM private key's first line (not a key; split so no scanner takes it for one).
KEY_MARKER = b"-----BEGIN " + b"PRIVATE KEY-----\n"


def as_other(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as uid/gid 65534 (the attacker)."""
    user = [f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups"]
    return subprocess.run(
        ["setpriv", *user, sys.executable, "-I", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Every name under ``top`` (not through links): mode, owner, content or link target."""
    seen: dict[str, tuple[object, ...]] = {}
    pending = [top]
    while pending:
        path = pending.pop()
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            body: object = os.readlink(path)
        elif stat.S_ISDIR(info.st_mode):
            body = sorted(os.listdir(path))
            pending.extend(path / name for name in os.listdir(path))
        else:
            body = path.read_bytes()
        seen[str(path.relative_to(top))] = (info.st_mode, info.st_uid, info.st_gid, body)
    return seen


def write_bundle(path: Path, device_id: str, role: str) -> Path:
    """A bundle as ``oscar-as enroll`` writes it (mode 0600), for an AS that is not running."""
    ca_key = certs.generate_signing_key("ES256")
    now = int(time.time())
    ca = certs.make_ca_certificate(
        ca_key, "test CA", serial=7, not_before=now - 60, not_after=now + 86_400
    )
    doc = {
        "id": device_id,
        "role": role,
        "as_uri": f"coaps://127.0.0.1:{free_port()}",
        "psk_identity": device_id,
        "psk_hex": os.urandom(16).hex(),
        "ca_cert_pem": ca.public_bytes(serialization.Encoding.PEM).decode(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return path


ROLES = ("as", "producer", "consumer", "proxy")


def command(role: str, bundles: Path, state: Path) -> list[str]:
    """The role's installed command on ``state`` (AS: an initialized state directory)."""
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    if role == "as":
        return [str(BIN / "oscar-as"), "serve", "--state", str(state), *listen]
    bundle = bundles / f"{role}.json"
    if not bundle.exists():
        write_bundle(bundle, f"{role}-1", role)
    common = ["--bundle", str(bundle), "--state", str(state)]
    if role == "producer":
        value = bundles / "value.txt"
        value.write_text("21.5")
        return [str(BIN / "oscar-producer"), *common, "--resource", f"temperature={value}", *listen]
    if role == "consumer":
        uri = f"coap://127.0.0.1:{free_port()}/sensor-1/temperature"
        return [str(BIN / "oscar-consumer"), *common, "--timeout", "3", "get", uri]
    return [str(BIN / "oscar-proxy"), *common, *listen]


def make_role_state(role: str, state: Path) -> None:
    """A state directory as the role leaves it (the AS's initialized, the others' empty)."""
    if role == "as":
        import asyncio

        asyncio.run(make_state(state))
    else:
        state.mkdir(mode=0o700)


def run_refused(role: str, bundles: Path, state: Path) -> str:
    """Run the role on ``state``; it must exit non-zero at once with one line on stderr."""
    proc = subprocess.run(
        command(role, bundles, state),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# --- the state directory, for each role's real process -------------------------------------------


@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_a_state_directory_of_another_user_is_refused(role: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_role_state(role, state)
    for path in [state, *state.iterdir()]:
        os.chown(path, OTHER, OTHER)
    before = snapshot(tmp_path / "state")
    line = run_refused(role, tmp_path, state)
    assert f"{state} belongs to uid {OTHER}, not to this user (uid 0): refusing it" in line
    assert snapshot(tmp_path / "state") == before


@pytest.mark.parametrize("role", ROLES)
def test_a_state_directory_reached_through_a_symlink_is_refused(role: str, tmp_path: Path) -> None:
    real = tmp_path / "real"
    make_role_state(role, real)
    real.chmod(0o777)
    state = tmp_path / "state"
    state.symlink_to(real)
    before = snapshot(real)
    line = run_refused(role, tmp_path, state)
    assert f"the state directory {state} is a symbolic link: refusing it" in line
    assert snapshot(real) == before  # not even repaired: it may be anyone's


@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_a_world_writable_state_directory_with_planted_names_is_refused(
    role: str, tmp_path: Path
) -> None:
    """What another user left in a 0777 directory (a file at a temporary name the old
    atomic_write would have used, a link to the bundle) makes the role refuse it, its content
    unchanged; the directory itself is closed (0700) before its entries are read, and stays so."""
    state = tmp_path / "state"
    make_role_state(role, state)
    state.chmod(0o777)
    planted = state / f".key.pem.{os.getpid() + 1}.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    os.chown(planted, OTHER, OTHER)
    before = snapshot(state)
    line = run_refused(role, tmp_path, state)
    assert f"the state directory {state} holds '{planted.name}' of uid {OTHER}" in line
    after = snapshot(state)
    assert stat.S_IMODE(after["."][0]) == 0o700  # type: ignore[call-overload]
    assert {k: v for k, v in after.items() if k != "."} == {
        k: v for k, v in before.items() if k != "."
    }
    assert after["."][1:] == before["."][1:]

    planted.unlink()
    (state / "keys.state").symlink_to(tmp_path / f"{role}.json")
    before = snapshot(tmp_path)
    line = run_refused(role, tmp_path, state)
    assert f"the state directory {state} holds a symbolic link 'keys.state'" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("role", ROLES)
def test_a_world_writable_state_directory_of_our_own_is_repaired(role: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_role_state(role, state)
    state.chmod(0o777)
    err = tmp_path / "stderr"
    with open(err, "wb") as out:
        proc = subprocess.Popen(command(role, tmp_path, state), stderr=out, cwd=ROOT)
    try:
        # The warning follows the repair: wait for it (a signal any earlier could cut it off).
        deadline = time.monotonic() + 60
        while "made it 0700" not in err.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700, err.read_text()
    assert f"the state directory {state} had mode 0777: made it 0700" in err.read_text()


# --- planted names against the real producer, by a real second user ------------------------------


@needs_root
def test_planted_temporary_names_cannot_receive_the_producer_key(shared: Path) -> None:
    """The attack of the finding, replayed: as uid 65534, plant world-writable files at every
    ``.key.pem.PID.tmp`` the producer could use next (and links to its bundle at others) in its
    0777 state directory. The producer refuses the directory and the attacker reads no key."""
    state = shared / "state"
    state.mkdir()
    state.chmod(0o777)
    bundle = write_bundle(shared / "producer.json", "producer-1", "producer")
    bundle_before = bundle.read_bytes()
    first = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1
    plant = (
        "import os, sys\n"
        "state, bundle, first = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "os.umask(0)\n"
        "for pid in range(first, first + 400):\n"
        "    name = os.path.join(state, f'.key.pem.{pid}.tmp')\n"
        "    if pid % 2: os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o666))\n"
        "    else: os.symlink(bundle, name)\n"
    )
    planted = as_other(plant, str(state), str(bundle), str(first))
    assert planted.returncode == 0, planted.stderr
    before = snapshot(state)
    producer = subprocess.run(
        command("producer", shared, state), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    steal = (
        "import os, sys\n"
        "found = []\n"
        "try:\n"
        "    names = os.listdir(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('closed'); sys.exit(0)\n"
        "for name in names:\n"
        "    try:\n"
        "        data = open(os.path.join(sys.argv[1], name), 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'PRIVATE KEY' in data: found.append(name)\n"
        "print(found)\n"
    )
    stolen = as_other(steal, str(state))
    assert stolen.returncode == 0, stolen.stderr
    assert stolen.stdout.strip() == "closed"  # the directory was closed before it was checked
    assert not any(  # and no key was written anywhere in it
        b"PRIVATE KEY" in p.read_bytes() for p in state.iterdir() if not p.is_symlink()
    )
    assert bundle.read_bytes() == bundle_before  # no key written through a planted link
    assert producer.returncode == 1
    assert producer.stderr.count("\n") == 1
    assert f"the state directory {state} holds" in producer.stderr
    after = snapshot(state)
    assert stat.S_IMODE(after["."][0]) == 0o700  # type: ignore[call-overload]
    assert {k: v for k, v in after.items() if k != "."} == {
        k: v for k, v in before.items() if k != "."
    }


# --- atomic_write, read_state_file, private_dir in process --------------------------------------


@needs_root
def test_atomic_write_ignores_names_planted_at_the_old_temporary_name(shared: Path) -> None:
    """Without the directory check (a caller that skips it): the old ``.NAME.PID.tmp`` planted
    as another user's 0666 file receives nothing; the key lands in a new file of ours, 0600."""
    target = shared / "key.pem"
    planted = shared / f".key.pem.{os.getpid()}.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    os.chown(planted, OTHER, OTHER)
    atomic_write(target, KEY_MARKER, 0o600)
    assert planted.read_bytes() == b""
    info = os.lstat(target)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert stat.S_ISREG(info.st_mode)
    assert target.read_bytes() == KEY_MARKER
    assert sorted(p.name for p in shared.iterdir()) == [planted.name, "key.pem"]


def test_atomic_write_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "bundle.json"
    victim.write_bytes(b"the bundle")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / f".key.pem.{os.getpid()}.tmp").symlink_to(victim)
    (state / "cert.pem").symlink_to(victim)
    atomic_write(state / "key.pem", b"secret", 0o600)
    atomic_write(state / "cert.pem", b"certificate", 0o644)  # replaces the link, not its target
    assert victim.read_bytes() == b"the bundle"
    assert not (state / "cert.pem").is_symlink()
    assert stat.S_IMODE(os.lstat(state / "cert.pem").st_mode) == 0o644
    assert (state / "key.pem").read_bytes() == b"secret"


def test_atomic_write_leaves_no_temporary_copy_when_the_rename_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "key.pem").mkdir()  # a directory in the way: the rename fails
    (state / "key.pem" / "x").write_bytes(b"")
    with pytest.raises(OSError):
        atomic_write(state / "key.pem", KEY_MARKER, 0o600)
    assert sorted(p.name for p in state.iterdir()) == ["key.pem"]


def test_atomic_write_makes_the_temporary_file_0600_from_the_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen from inside the write: the temporary file is new, random-named and 0600 while it
    is being written, whatever the final mode; afterwards no temporary name is left."""
    seen: list[tuple[str, int]] = []
    real_write = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        info = os.fstat(fd)
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_IMODE(info.st_mode)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)  # a spy: the real write still happens
    atomic_write(tmp_path / "cert.pem", b"x" * 10, 0o644)
    monkeypatch.undo()
    (name, mode), *_ = seen
    assert mode == 0o600
    assert Path(name).parent == tmp_path and Path(name).name.startswith(".cert.pem.")
    assert f".{os.getpid()}." not in Path(name).name
    assert stat.S_IMODE((tmp_path / "cert.pem").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["cert.pem"]


def test_state_files_are_not_read_through_a_symlink_or_from_a_fifo(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours to read")
    (tmp_path / "keys.state").symlink_to(elsewhere)
    with pytest.raises(StateError, match="is a symbolic link: refusing to follow it"):
        read_state_file(tmp_path / "keys.state")
    with pytest.raises(StateError, match="is a symbolic link"):
        SealedFile(tmp_path / "keys.state", bytes(32), "test").load()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StateError, match="is not a regular file"):
        read_state_file(tmp_path / "fifo")  # refused at once, not blocked on a writer
    assert read_state_file(tmp_path / "absent") is None
    (tmp_path / "key.pem").write_bytes(b"k")
    (tmp_path / "key.pem").chmod(0o640)
    with pytest.raises(StateError, match="is readable by others: chmod 600 it"):
        read_state_file(tmp_path / "key.pem", private=True)


@needs_root
def test_a_state_file_of_another_user_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"the attacker's key")
    (tmp_path / "key.pem").chmod(0o600)
    os.chown(tmp_path / "key.pem", OTHER, OTHER)
    with pytest.raises(StateError, match=f"belongs to uid {OTHER}, not to this user"):
        read_state_file(tmp_path / "key.pem", private=True)


def test_private_dir_makes_0700_and_names_control_characters_safely(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    (made / "x\n\x1b[31mfake line").symlink_to(tmp_path)
    with pytest.raises(StateError) as refused:
        private_dir(made)
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StateError, match="is not a directory"):
        private_dir(tmp_path / "file")


def test_the_as_database_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """``as.db`` is made 0600 before SQLite opens it (its -wal and -shm follow its mode), not
    with the umask's 0644; ``oscar-as init`` on a state directory that is a symlink changes
    nothing."""
    state = tmp_path / "state"
    init = [str(BIN / "oscar-as"), "init", "--state", str(state), "--as-uri", "coaps://127.0.0.1"]
    subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", *init], check=True, cwd=ROOT)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert modes == {"as.db": 0o600, "master.key": 0o600, "ca.pem": 0o644}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    real = tmp_path / "empty"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    init[3] = str(tmp_path / "link")
    refused = subprocess.run(init, capture_output=True, text=True, cwd=ROOT, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"oscar-as init: error: the state directory {tmp_path / 'link'} is a symbolic link: "
        "refusing it (name the real directory)"
    ]
    assert list(real.iterdir()) == [] and stat.S_IMODE(real.stat().st_mode) == 0o755
