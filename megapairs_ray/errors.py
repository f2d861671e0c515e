"""The project's one error base class.

Every error a user can cause — a config, an input, a storage location, a benchmark folder, a
gallery that is not there — is a ``MegapairsError`` whose message names the cause and the fix.
The CLI (and so every job entrypoint) prints such an error as one line and exits non-zero; a
traceback is kept for what is a bug. Subclasses also derive from the builtin their callers
already catch (``ValueError``, ``RuntimeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class MegapairsError(Exception):
    """A failure with a cause the user can act on; ``str(e)`` is the whole message."""

    exit_code = 1
