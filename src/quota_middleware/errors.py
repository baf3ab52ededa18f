"""Exception types. Every error this library raises is a :class:`QuotaError`::

    QuotaError
    ├── ConfigurationError (ValueError)   a bad policy or config value, at construction time
    ├── InvalidArgument (ValueError)      a bad argument to a call: KeyStore.create / rotate,
    │                                     top_callers
    ├── BackendMismatch (TypeError)       a sync call on an async backend or the reverse, or a
    │                                     source that is not a sync Redis client (reports)
    ├── IdentificationError               the caller could not be identified: 401
    │   ├── MissingCredentials
    │   └── InvalidCredentials
    ├── StorageError                      the store could not be reached or answered an error
    ├── RequestTooLarge                   an AI request body over its cap: 413
    ├── ModelNotAllowed                   a model outside the plan's allow-list: 403
    ├── UnpricedModel                     a budgeted model without a price (pricing.py)
    ├── TokenizerUnavailable              a bundled vocabulary is missing or corrupt
    │                                     (estimate.py)
    ├── ApiKeyError                       an admin operation on a stored API key failed
    │   ├── ApiKeyNotFound (ValueError)   no such key
    │   ├── ApiKeyNotActive (ValueError)  the key is revoked or expired
    │   └── KeyIdExhausted (RuntimeError) no unique key id could be allocated
    └── DeliveryError                     an alert sink refused or could not take an event

A builtin base in parentheses is kept so that ``except ValueError`` (``TypeError``,
``RuntimeError``) written before the error had its own type still catches it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class QuotaError(Exception):
    """Base class of every error raised by quota-middleware."""


class ConfigurationError(QuotaError, ValueError):
    """The configuration is invalid. Raised at construction time, never at the first request.

    :param field: dotted path of the offending field, e.g. ``plans.pro.limits[0].rate``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


# -- policy tables: the checks every ``from_dict`` shares, so each error names its field ----------


def check_keys(
    table: Mapping[str, object],
    allowed: Collection[str],
    where: str,
    *,
    python_only: Collection[str] = (),
) -> None:
    """A :class:`ConfigurationError` naming the first key of a policy table not in ``allowed``
    (``where`` is the table's dotted path, ``""`` at the top level); a key in ``python_only``
    is named as one that only Python code can set."""
    for key in table:
        if key not in allowed:
            dotted = f"{where}.{key}" if where else key
            hint = " (Python only)" if key in python_only else ""
            expected = sorted(allowed)
            raise ConfigurationError(dotted, f"unknown key{hint}; expected one of {expected}")


def construct(cls: Callable[..., T], params: Mapping[str, Any], where: str) -> T:
    """``cls(**params)`` from a policy table; any error becomes a :class:`ConfigurationError`
    whose field is the table's path (``plans.free.limits[0].rate``), not the class's own."""
    try:
        return cls(**params)
    except ConfigurationError as e:
        field_name = e.field.split(".")[-1]
        raise ConfigurationError(f"{where}.{field_name}", str(e).split(": ", 1)[-1]) from None
    except TypeError as e:
        raise ConfigurationError(where, str(e)) from None


class InvalidArgument(QuotaError, ValueError):
    """An argument to a call is out of range (a caller name, a lifetime, a report's period)."""


class BackendMismatch(QuotaError, TypeError):
    """A sync call on an async backend or the reverse, or a source that is not a sync Redis
    client or backend."""


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


class ModelNotAllowed(QuotaError):
    """The request's model is not on the plan's ``models`` allow-list; answered with 403."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        super().__init__(f"model {model!r} is not allowed on this plan")


class ApiKeyError(QuotaError):
    """An admin operation on a stored API key (:class:`~quota_middleware.apikeys.KeyStore`)
    failed."""


class ApiKeyNotFound(ApiKeyError, ValueError):
    """There is no API key with this id."""


class ApiKeyNotActive(ApiKeyError, ValueError):
    """The API key is revoked or expired, and the operation needs an active one."""


class KeyIdExhausted(ApiKeyError, RuntimeError):
    """No unique key id could be allocated (a collision, several times in a row)."""


class DeliveryError(QuotaError):
    """A sink refused or could not take an event (non-2xx, network error, callable raised)."""
