"""User-facing errors.

A ``UserError`` is a mistake in what the user asked for (a bad path, an unknown metric, an
impossible budget). The CLI prints its message on one line and exits with code 2; everything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""
