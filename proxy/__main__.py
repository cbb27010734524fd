"""``python -m proxy``: the same as ``oscar-proxy`` (:mod:`proxy.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
