"""``python -m demo``: the same as ``oscar-demo``."""

import sys

from .cli import main

sys.exit(main())
