"""The one exception type the data package raises for bad input or bad paths."""

from __future__ import annotations


class DataError(ValueError):
    """Raised for unreadable, malformed or missing data; the message is one sentence a user can act on."""
