"""Config targets' shared part: the input as a TOML file in a private temporary directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["config_file"]

_directory: list[Path] = []


def config_file(data: bytes) -> Path:
    """Write ``data`` to the one config file (mode 0600) and return its path."""
    if not _directory:
        _directory.append(Path(tempfile.mkdtemp(prefix="oscar-fuzz-config-")))
        atexit.register(shutil.rmtree, _directory[0], True)
    path = _directory[0] / "config.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
