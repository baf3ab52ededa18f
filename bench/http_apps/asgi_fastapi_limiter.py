"""fastapi-limiter 0.2 (built on pyrate-limiter) on Redis, keyed by client IP + path.

fastapi-limiter 0.2 dropped ``FastAPILimiter.init(redis)``: ``RateLimiter`` takes a
``pyrate_limiter.Limiter``. pyrate-limiter's ``RedisBucket`` is one sorted set (a sliding log, one
member per request) per bucket, so a per-IP limit needs a bucket factory that creates one
``RedisBucket`` per key; this is that factory, the documented extension point.
"""

import os
from time import time_ns

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import BucketFactory, Duration, Limiter, Rate, RateItem
from pyrate_limiter.buckets.redis_bucket import LuaScript, RedisBucket

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RATES = [Rate(1_000_000, Duration.SECOND)]
SCRIPT_SHA = redis.Redis.from_url(URL).script_load(LuaScript.PUT_ITEM)


class PerKeyRedisBuckets(BucketFactory):
    def __init__(self) -> None:
        self.client = aioredis.Redis.from_url(URL)
        self.buckets: dict[str, RedisBucket] = {}

    def wrap_item(self, name: str, weight: int = 1) -> RateItem:
        return RateItem(name, time_ns() // 1_000_000, weight=weight)

    def get(self, item: RateItem) -> RedisBucket:
        bucket = self.buckets.get(item.name)
        if bucket is None:
            bucket = self.create(RedisBucket, RATES, self.client, f"fl:{item.name}", SCRIPT_SHA)
            self.buckets[item.name] = bucket
        return bucket


limiter = Limiter(PerKeyRedisBuckets())
app = FastAPI()


@app.get("/", dependencies=[Depends(RateLimiter(limiter=limiter))])
async def index() -> dict[str, bool]:
    return {"ok": True}
