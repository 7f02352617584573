"""User-facing errors.

Every error a user can cause (bad path, bad bit width, corrupt file, ...) is raised as
:class:`DupqError` with a one-line message that says what is wrong and what to do.
The CLI prints that line and exits with code 1; it never shows a traceback for these.
"""


class DupqError(Exception):
    """An error caused by the input, with a one-line, actionable message."""


class UsageError(DupqError):
    """A bad command-line value (``--ctx 0``, an unknown ``--data`` set): the CLI exits with code 2."""
