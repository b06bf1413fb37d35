"""The one error type a user sees: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a name, a file, a target). The message is the whole story."""
