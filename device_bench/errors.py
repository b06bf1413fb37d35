"""The one exception the CLI turns into a one-line message and an exit code."""
from __future__ import annotations

USAGE = 2  # the user asked for something impossible: bad option, missing file, bad host string
FAILED = 1  # the request was fine but the work failed: board unreachable, a measurement crashed


class BenchError(Exception):
    """A problem the user can act on. `str(e)` is the whole message: one line, no traceback."""

    def __init__(self, message: str, exit_code: int = USAGE):
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
