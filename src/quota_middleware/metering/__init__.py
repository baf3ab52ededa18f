"""Reading what an AI call cost: the response framer (``_framing``: decompression, SSE/NDJSON/
JSON-array framing), the per-provider usage readers (``_providers``), the usage parser and its
:class:`Usage` value (``_usage``), prompt-token estimates (``_estimate``) and the price table
(:mod:`.pricing`, public).

Pure functions and small stateful parsers over bytes; no I/O, no store, no policy. May import
:mod:`quota_middleware.errors` only. The policy (:mod:`quota_middleware.config`) imports this
layer, so this package's ``__init__`` never imports the policy or the core.
"""

from __future__ import annotations

from quota_middleware.metering._usage import Format, Usage, UsageParser

__all__ = ["Format", "Usage", "UsageParser"]
