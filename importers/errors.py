"""The one error every importer raises: the import cannot proceed, and nothing was written."""

from __future__ import annotations


class ImportFailure(Exception):
    """A source model cannot be imported; the message names the problem in one line."""
