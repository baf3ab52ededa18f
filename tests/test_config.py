"""Configuration: bad policies fail at construction with an error naming the field, never with
another exception and never at the first request."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quota_middleware import (
    AppBudget,
    Budget,
    ConfigurationError,
    Plan,
    QuotaConfig,
    RequestRate,
    StorageConfig,
    TokenQuota,
)
from quota_middleware.config import mask_url
from quota_middleware.limits import parse_rate

BAD = {
    "no plans": ("", "plans"),
    "limits not a list": ("[plans.free]\nlimits = 3", "plans.free.limits"),
    "unknown limit type": ('[plans.free]\nlimits = [{type = "nope"}]', "plans.free.limits[0].type"),
    "bad rate": ('[plans.free]\nlimits = [{type = "requests", rate = "10/sec0nd"}]',
                 "plans.free.limits[0].rate"),
    "zero burst": ('[plans.free]\nlimits = [{type = "requests", rate = "1/s", burst = 0}]',
                   "plans.free.limits[0].burst"),
    "derived field": ('[plans.free]\nlimits = [{type = "requests", rate = "1/s", interval_us = 3}]',
                      "plans.free.limits[0].interval_us"),
    "unknown plan key": ("[plans.free]\nlimit = []", "plans.free.limit"),
    "bad timezone": ('[plans.free]\ntimezone = "Mars/Olympus"', "plans.free.timezone"),
    "bad on_error": ('[plans.free]\non_error = "maybe"', "plans.free.on_error"),
    "bad storage url": ('[plans.free]\n[storage]\nurl = "mysql://x"', "storage.url"),
    "unknown top key": ("[plans.free]\n[routs]\nexempt = []", "routs"),
    "weights not tables": ("[plans.free]\n[routes]\nweights = [3]", "routes.weights[0]"),
    "include not a list": ("[plans.free]\n[routes]\ninclude = 3", "routes.include"),
    "bad ai format": ('[plans.free]\n[[ai_routes]]\npath = "/v1/x"\nformat = "gpt"',
                      "ai_routes[/v1/x].format"),
    "bad threshold": ('[plans.free]\nlimits = [{type = "token_quota", tokens = 5, '
                      'thresholds = [0]}]', "plans.free.limits[0].thresholds"),
    "bad price": ('[plans.free]\n[prices."m"]\ninput = "cheap"\noutput = 1', "prices.m.input"),
    "default price missing": ('unpriced = "default"\n[plans.free]', "default_price"),
    "bad default plan": ('default_plan = "gold"\n[plans.free]', "default_plan"),
    "weight above burst": ('[plans.free]\nlimits = [{type = "requests", rate = "2/m"}]\n'
                           '[routes]\nweights = [{path = "/x", weight = 3}]',
                           "plans.free.limits.2-m.burst"),
    "jwt none alg": ('[plans.free]\n[identity.jwt]\nalgorithms = ["none"]\nsecret = "' + "x" * 40
                     + '"', "identity.jwt.algorithms"),
    "not toml": ("[plans.free\n", "policy"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_policy_names_the_field(case: str, tmp_path: Path) -> None:
    text, field = BAD[case]
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigurationError) as info:
        QuotaConfig.from_toml(path)
    assert info.value.field == field, str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        QuotaConfig.from_toml("/nonexistent/policy.toml")


def test_example_policies_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_JWT_SECRET", "x" * 40)
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in root.glob("*/policy.toml"):
        config = QuotaConfig.from_toml(path)
        assert config.ai_routes and config.plans


def test_rates() -> None:
    assert parse_rate("10/second") == (10, 1)
    assert parse_rate("1000 per hour") == (1000, 3600)
    assert parse_rate("5/10s") == (5, 10)
    assert parse_rate("3/2.5 minutes") == (3, 150)
    assert RequestRate(rate="10/second", burst=20).interval_us == 100_000


def test_env_overrides_storage_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUOTA_REDIS_URL", "redis://:hunter2@example:6379/3")
    storage = StorageConfig(url="memory://", prefix="app")
    built = QuotaConfig(plans=[Plan(name="p")], storage=storage)
    assert built.storage.url == "memory://"  # a value built in code does not read the environment
    path = tmp_path / "policy.toml"
    path.write_text('[plans.p]\n[storage]\nurl = "memory://"\nprefix = "app"\n')
    for config in (built.with_env(), QuotaConfig.from_toml(path)):
        assert config.storage.url == "redis://:hunter2@example:6379/3"
        assert config.storage.prefix == "app"
        assert "hunter2" not in repr(config.storage)


def test_python_construction_errors() -> None:
    with pytest.raises(ConfigurationError):
        Plan(name="bad name!")
    with pytest.raises(ConfigurationError):
        Budget(usd=-1)
    with pytest.raises(ConfigurationError):
        TokenQuota(tokens=0)
    with pytest.raises(ConfigurationError):
        AppBudget(usd=1, period="week")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unique"):
        QuotaConfig(plans=[Plan(name="a"), Plan(name="a")])
    with pytest.raises(ConfigurationError, match="duplicate"):
        Plan(name="p", limits=[RequestRate(rate="1/s"), RequestRate(rate="1/s")])


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=12,
)  # fmt: skip
_keys = st.sampled_from(["plans", "routes", "storage", "identity", "ai_routes", "prices",
                         "unpriced", "default_plan", "app_budgets", "spikes", "alerts",
                         "usage_retention_days", "limits", "type", "rate"])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5), st.dictionaries(st.text(max_size=6), _values))
def test_any_policy_shape_is_a_configuration_error_or_loads(
    data: dict[str, Any], plan: dict[str, Any]
) -> None:
    if plan:
        data = {**data, "plans": {"p": plan}}
    try:
        QuotaConfig.from_dict(data)
    except ConfigurationError:
        pass


def test_urls_are_masked() -> None:
    assert mask_url("redis://h:6379/0?password=s3cr3t") == "redis://h:6379/0?password=***"
    assert mask_url("redis://:p@ssw0rd@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("memory://") == "memory://"


def test_the_middlewares_apply_the_environment_to_a_config_built_in_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUOTA_REDIS_URL overrides storage.url at middleware construction (the README's promise),
    while the QuotaConfig value itself stays as it was built."""
    from quota_middleware import Plan, QuotaConfig, QuotaMiddleware, WSGIQuotaMiddleware

    monkeypatch.setenv("QUOTA_REDIS_URL", "redis://127.0.0.1:1/0")
    built = QuotaConfig(plans=[Plan(name="p")])
    assert built.storage.url == "memory://"
    asgi = QuotaMiddleware(lambda *a: None, config=built)  # type: ignore[arg-type]
    assert asgi.config.storage.url == "redis://127.0.0.1:1/0"
    wsgi = WSGIQuotaMiddleware(lambda e, s: [], config=built)  # type: ignore[arg-type]
    assert wsgi.config.storage.url == "redis://127.0.0.1:1/0"
    assert built.storage.url == "memory://"


def test_time_zones_work_without_the_systems_zoneinfo() -> None:
    """``tzdata`` is a dependency: a slim image without /usr/share/zoneinfo still has zones."""
    import zoneinfo

    zoneinfo.reset_tzpath(to=[])
    try:
        zoneinfo.ZoneInfo.clear_cache()
        plan = Plan(name="p", timezone="Europe/Berlin")
        assert plan.zone.key == "Europe/Berlin"
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()
