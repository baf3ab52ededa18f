"""Flask-Limiter on Redis (limits' fixed window, one Lua call per limit), keyed by client IP."""

import os

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

app = Flask(__name__)
limiter = Limiter(
    get_remote_address,
    app=app,
    default_limits=["1000000/second"],
    storage_uri=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
)


@app.get("/")
def index() -> dict[str, bool]:
    return {"ok": True}
