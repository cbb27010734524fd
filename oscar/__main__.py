"""``python -m oscar``: runs the operator tool of :mod:`oscar.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
