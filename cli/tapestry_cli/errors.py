"""Errors the `tapestry` command reports as one line, without a traceback.

Both kinds exit with status 2: the message says what to change, or what in the store
was refused. Anything else that escapes a command is a bug (status 1).
"""


class UsageError(Exception):
    """A problem with what the user asked for; the message says what to change."""


class RefusedInput(Exception):
    """The store holds something that does not verify; the message says what and where."""
