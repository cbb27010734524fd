"""``python -m authz_server``: runs the AS's admin tool and server, :mod:`authz_server.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
