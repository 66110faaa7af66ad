"""Errors the `tapestry` command reports as one line, without a traceback."""


class UsageError(Exception):
    """A problem with what the user asked for; the message says what to change."""
