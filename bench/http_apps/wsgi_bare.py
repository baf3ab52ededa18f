"""WSGI baseline: Flask, one JSON route, no limiter."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index() -> dict[str, bool]:
    return {"ok": True}
