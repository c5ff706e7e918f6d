"""The launcher's error type."""

from mgm_ref.errors import MGMError


class ServerError(MGMError, RuntimeError):
    """The server could not be found, set up, started or made ready."""
