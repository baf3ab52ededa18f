"""quota-middleware (ASGI) on the memory store, keyed by client IP."""

from fastapi import FastAPI

from quota_middleware import QuotaMiddleware

from ._common import plain_config

app = FastAPI()
app.add_middleware(QuotaMiddleware, config=plain_config("memory"))


@app.get("/")
async def index() -> dict[str, bool]:
    return {"ok": True}
