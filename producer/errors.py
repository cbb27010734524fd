"""The producer's own exceptions (the tree is drawn in :mod:`producer`'s docstring).

Both are :class:`~oscar.errors.OscarError` s; the runtime's (:class:`~oscar_io.errors.BundleError`,
:class:`~oscar_io.errors.StateError`, :class:`~oscar_io.errors.AsError` …) come from
:mod:`oscar_io.errors` unchanged.
"""

from __future__ import annotations

from oscar.errors import OscarError
from oscar_io.errors import UsageError

__all__ = ["ConfigError", "ProducerError"]


class ConfigError(UsageError, ValueError):
    """The configuration (file, flags or code) is unusable; the message names the field (exit 2).
    A :class:`~oscar_io.errors.UsageError`, as every role's; a ``ValueError`` too, as the
    dataclasses' checks raise it."""


class ProducerError(OscarError):
    """The producer cannot start: a bundle for another role, a resource id too long, or no
    certificate to be had (exit 1)."""
