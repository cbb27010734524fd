"""``python -m consumer``: the same as the ``oscar-consumer`` command (:mod:`consumer.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
