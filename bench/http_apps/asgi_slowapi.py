"""slowapi on Redis (limits' fixed window, one Lua call per limit), keyed by client IP.

``SlowAPIASGIMiddleware`` (pure ASGI) applies ``default_limits`` to every route.
"""

import os

from fastapi import FastAPI
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address

limiter = Limiter(
    key_func=get_remote_address,
    default_limits=["1000000/second"],
    storage_uri=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
app.add_middleware(SlowAPIASGIMiddleware)


@app.get("/")
async def index() -> dict[str, bool]:
    return {"ok": True}
