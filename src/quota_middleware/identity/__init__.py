"""Who is calling: JWTs (``_jwt``), API keys (``_keyformat``: the key format and records;
``_keystore``: the admin :class:`KeyStore`; ``_apikeys``: the policy's key table and the request
verifier with its TTL cache), the client IP behind trusted
proxies (``_client_ip``), and the :class:`Identifier` that turns a request into a
:class:`Caller` (``_identifier``).

May import :mod:`quota_middleware.errors`, :mod:`quota_middleware.limits` and
:mod:`quota_middleware.base`; never the policy, the core, a store or an adapter. A key lookup is a
script call yielded to the caller's driver, so this layer does no I/O itself.
"""

from __future__ import annotations

from quota_middleware.identity._apikeys import ApiKeyConfig
from quota_middleware.identity._client_ip import client_id
from quota_middleware.identity._identifier import Caller, Identifier, IdentityConfig
from quota_middleware.identity._jwt import JWTConfig
from quota_middleware.identity._keyformat import KeyRecord, generate_key
from quota_middleware.identity._keystore import KeyStore

__all__ = [
    "ApiKeyConfig",
    "Caller",
    "IdentityConfig",
    "Identifier",
    "JWTConfig",
    "KeyRecord",
    "KeyStore",
    "client_id",
    "generate_key",
]
