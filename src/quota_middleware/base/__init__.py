"""The vocabulary every layer speaks: script calls and the scripts' sources (``_scripts``, with
``lua/``), every Redis key name (``_keys``), calendar periods (``_periods``), the protocol-neutral
request (``_request``), alert events (``_events``), the backend protocols (``_protocols``) and the
two drivers that run a flow on a sync or an async backend (``_flows``).

Owns no policy and does no I/O of its own (a driver only calls the backend it is given). May
import :mod:`quota_middleware.errors` and :mod:`quota_middleware.limits`, nothing else of the
package. Private: the public names are re-exported by :mod:`quota_middleware`.
"""
