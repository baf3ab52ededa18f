"""AI route, passthrough: the fake upstream with no middleware."""

from ._ai import ai_app as app

__all__ = ["app"]
