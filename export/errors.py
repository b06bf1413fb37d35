"""Two kinds of failure. The CLI prints either on one line; user errors exit 2, export failures 1."""


class UserError(Exception):
    """Bad input from the user (a path, a format name, a missing file). The message is the whole story."""


class ExportError(Exception):
    """The export ran but its result is wrong (parity or accuracy check failed, a forbidden op)."""
