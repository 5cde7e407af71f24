"""Errors that the user can fix by changing a flag or an input."""


class UsageError(ValueError):
    """An invalid setting or input, with a message that names the fix.

    Entry points print these without a traceback and exit with status 2.
    """
