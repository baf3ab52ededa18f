"""The sans-IO core: decisions and charges as values (``_decision``) and as HTTP responses
(``_responses``), the state admission and settlement share (``_context``), the learned input
margins (``_margins``), pricing an AI request and metering its response (``_meter``), mid-stream
top-ups and the hard stop (``_extension``, ``_hardstop``), settlement (``_settlement``), admission
and the :class:`Engine` facade over both (``_engine``), and the per-request exchange both
adapters drive (``_exchange``).

Every phase that needs the store is a generator that yields a script call and is sent the reply;
nothing here imports redis, asyncio or a web framework (``tests/test_architecture.py`` checks).
May import the policy (:mod:`quota_middleware.config`), :mod:`.metering`, :mod:`.identity` and
:mod:`.base`; never a store, an adapter or the alert delivery. Private: the adapters and
:mod:`quota_middleware` re-export what users need.
"""
