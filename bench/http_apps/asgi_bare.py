"""ASGI baseline: FastAPI, one JSON route, no limiter."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def index() -> dict[str, bool]:
    return {"ok": True}
