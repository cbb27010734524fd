"""``python -m producer``: the same as ``oscar-producer`` (:mod:`producer.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
