"""The launcher's error type."""


class ServerError(RuntimeError):
    """The server could not be found, set up, started or made ready."""
