"""quota-middleware (ASGI) on Redis, keyed by the ``X-Caller`` header (scale runs: N callers)."""

from fastapi import FastAPI

from quota_middleware import QuotaMiddleware

from ._common import plain_config

app = FastAPI()
app.add_middleware(QuotaMiddleware, config=plain_config("redis", by_header=True))


@app.get("/")
async def index() -> dict[str, bool]:
    return {"ok": True}
