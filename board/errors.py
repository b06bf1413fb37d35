"""The two ways a board run ends early."""


class BoardError(Exception):
    """Something failed: one line, exit status 1."""


class Unavailable(Exception):
    """This machine cannot run an emulated board (not root, no apt, no binfmt_misc): the reason is
    printed and, with --skip-if-unable, the run is skipped rather than failed."""
