"""The two errors a runtime user sees. Each message is one line and says what to do;
the CLI prints it and exits 2 (a failed `verify` exits 1)."""


class RuntimeUserError(Exception):
    """Base of the runtime's user-facing errors."""


class BundleError(RuntimeUserError):
    """The bundle cannot be used: missing/unknown manifest field, checksum mismatch, corrupt model,
    unsupported format, or no interpreter installed for it."""


class InputError(RuntimeUserError, ValueError):
    """The images (or preprocessed tensor) passed in do not fit the model."""
