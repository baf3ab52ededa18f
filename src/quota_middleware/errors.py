"""Exception types. Every error this library raises is a :class:`QuotaError`."""

from __future__ import annotations


class QuotaError(Exception):
    """Base class of every error raised by quota-middleware."""


class ConfigurationError(QuotaError, ValueError):
    """The configuration is invalid. Raised at construction time, never at the first request.

    :param field: dotted path of the offending field, e.g. ``plans.pro.limits[0].rate``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class IdentificationError(QuotaError):
    """The caller could not be identified; answered with 401."""

    #: machine-readable reason, sent in ``WWW-Authenticate`` as ``error_description``
    reason: str = "invalid_credentials"

    def __init__(self, message: str, *, scheme: str = "Bearer") -> None:
        self.scheme = scheme
        super().__init__(message)


class MissingCredentials(IdentificationError):
    reason = "missing_credentials"


class InvalidCredentials(IdentificationError):
    reason = "invalid_credentials"


class StorageError(QuotaError):
    """The store (Redis) could not be reached or answered with an error."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        self.original = original
        super().__init__(message)

    @property
    def outage(self) -> bool:
        """The store could not be reached (circuit open, no connection, a timeout), as opposed
        to a store that answered with an error: retrying later may succeed."""
        if self.original is None:
            return True
        names = {c.__name__ for c in type(self.original).__mro__}
        return bool(names & {"ConnectionError", "TimeoutError", "OSError", "BusyLoadingError"})


class RequestTooLarge(QuotaError):
    """An AI request body is over the configured cap; answered with 413."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body exceeds {limit} bytes")
