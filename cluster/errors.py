"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or environment. The message says what is wrong and what to do about it."""
