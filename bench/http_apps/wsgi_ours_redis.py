"""quota-middleware (WSGI) on the redis store, keyed by client IP."""

from flask import Flask

from quota_middleware import WSGIQuotaMiddleware

from ._common import plain_config

app = Flask(__name__)
app.wsgi_app = WSGIQuotaMiddleware(app.wsgi_app, config=plain_config("redis"))  # type: ignore[method-assign]


@app.get("/")
def index() -> dict[str, bool]:
    return {"ok": True}
