"""The producer's exceptions (the tree is drawn in :mod:`producer`'s docstring).

``ConfigError`` is the runtime's (:class:`oscar_io.errors.ConfigError`, the same class as the
proxy's), re-exported here; ``ProducerError`` is the producer's own. The runtime's others
(:class:`~oscar_io.errors.BundleError`, :class:`~oscar_io.errors.StateError`,
:class:`~oscar_io.errors.AsError` …) come from :mod:`oscar_io.errors` unchanged.
"""

from __future__ import annotations

from oscar.errors import OscarError
from oscar_io.errors import ConfigError

__all__ = ["ConfigError", "ProducerError"]


class ProducerError(OscarError):
    """The producer cannot start: a bundle for another role, a resource id too long, or no
    certificate to be had (exit 1)."""
