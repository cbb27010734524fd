"""``python -m oscar_io``: runs the operator tool of :mod:`oscar_io.tool`."""

from __future__ import annotations

import sys

from .tool import main

if __name__ == "__main__":
    sys.exit(main())
