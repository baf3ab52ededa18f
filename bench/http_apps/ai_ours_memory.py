"""AI route through quota-middleware's metering path (AIRoute openai-chat; request and token
buckets, daily token quota, monthly budget) on the memory store: admit + meter + settle."""

from quota_middleware import QuotaMiddleware

from ._ai import ai_app
from ._common import ai_config

app = QuotaMiddleware(ai_app, config=ai_config("memory"))
