"""One module per benchmark variant, each exposing ``app`` (ASGI) or ``app`` (WSGI, Flask).

Every variant serves the same route, ``GET /`` -> ``{"ok": true}``, with limits that never
trigger (1,000,000 requests per second or the peer's equivalent), keyed by client IP. Redis
variants read ``REDIS_URL`` from the environment. See bench/README.md ("HTTP throughput").
"""
