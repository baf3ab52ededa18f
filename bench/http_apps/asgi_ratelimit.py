"""asgi-ratelimit (``ratelimit`` package) on Redis, keyed by client IP.

Its bundled ``client_ip`` authenticator refuses non-global addresses (loopback), so the
authenticator here returns the peer address as-is, like the other variants.
"""

import os

import redis.asyncio as aioredis
from fastapi import FastAPI
from ratelimit import RateLimitMiddleware, Rule
from ratelimit.backends.redis import RedisBackend


async def by_ip(scope: dict) -> tuple[str, str]:  # type: ignore[type-arg]
    return scope["client"][0], "default"


app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    authenticate=by_ip,
    backend=RedisBackend(
        aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ),
    config={r"^/": [Rule(second=1_000_000)]},
)


@app.get("/")
async def index() -> dict[str, bool]:
    return {"ok": True}
