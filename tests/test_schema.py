"""The policy file's JSON Schema: generated from the configuration types, shipped in the
package equal to what this version generates, valid draft 2020-12, accepting every policy the
project ships (examples, test data, the README's TOML) and refusing what the loader refuses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from quota_middleware import QuotaConfig
from quota_middleware.cli import main
from quota_middleware.errors import ConfigurationError
from quota_middleware.schema import policy_schema, schema_json

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = resources.files("quota_middleware") / "policy.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(policy_schema())


def test_the_shipped_schema_is_what_this_version_generates() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == schema_json(), (
        "src/quota_middleware/policy.schema.json is out of date: run "
        "`quota-middleware schema --write src/quota_middleware/policy.schema.json`"
    )
    jsonschema.Draft202012Validator.check_schema(json.loads(SHIPPED.read_text(encoding="utf-8")))


def test_every_table_of_the_policy_is_in_it() -> None:
    props = policy_schema()["properties"]
    for key in ("plans", "storage", "identity", "routes", "ai_routes", "app_budgets",
                "tenant_budgets", "alerts", "proxy", "admin", "prices", "prices_file"):  # fmt: skip
        assert key in props, key
    assert props["storage"]["properties"]["hash_tag"]["enum"] == ["caller", "tenant"]
    limits = props["plans"]["additionalProperties"]["properties"]["limits"]["items"]["oneOf"]
    assert sorted(lim["properties"]["type"]["const"] for lim in limits) == [
        "budget", "concurrency", "requests", "token_quota", "tokens"
    ]  # fmt: skip
    # Python-only values (callables) are not keys of a file; the resolver is an import path
    assert "callables" not in props["alerts"]["properties"]
    assert props["identity"]["properties"]["resolver"]["type"] == "string"


def _policies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in [*ROOT.glob("examples/*/policy.toml"), *ROOT.glob("tests/data/*.toml")]:
        out.append((str(path.relative_to(ROOT)), tomllib.loads(path.read_text())))
    readme = (ROOT / "README.md").read_text()
    for i, m in enumerate(re.finditer(r"```toml\n(.*?)```", readme, re.S)):
        data = tomllib.loads(m.group(1))
        data.setdefault("plans", {"p": {}})  # a fragment of a policy: give it its one table
        out.append((f"README.md toml block {i}", data))
    return out


@pytest.mark.parametrize(
    ("where", "data"), _policies(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_policy_the_project_ships_validates(where: str, data: dict[str, Any]) -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(data)]
    assert not errors, (where, errors)


BAD = [
    ({"plans": {"p": {}}, "colour": "blue"}, "colour"),
    ({"plans": {"p": {"limits": [{"type": "requests", "rate": "5/minute", "brust": 5}]}}}, "brust"),
    ({"plans": {"p": {"limits": [{"type": "gallons", "rate": "5/minute"}]}}}, "gallons"),
    ({"plans": {"p": {}}, "storage": {"hash_tag": "shard"}}, "hash_tag"),
    ({"plans": {"p": {}}, "usage_retention_days": "forever"}, "usage_retention_days"),
    ({"plans": {"p": {}}, "ai_routes": [{"format": "openai-chat"}]}, "path"),
    ({"plans": {"p": {"on_error": "maybe"}}}, "on_error"),
    ({"plans": {"p": {}}, "prices": {"m": {"input": 1}}}, "output"),
    ({"plans": {"p": {}}, "alerts": {"slack": 5}}, "slack"),
]


@pytest.mark.parametrize(("data", "field"), BAD)
def test_what_the_loader_refuses_the_schema_refuses(data: dict[str, Any], field: str) -> None:
    errors = list(VALIDATOR.iter_errors(data))
    assert errors, data
    # ... and the loader names the field, as it always does
    with pytest.raises(ConfigurationError, match=field):
        QuotaConfig.from_dict(data)


def test_the_command_prints_writes_and_checks_it(tmp_path: Path, capsys: Any) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == policy_schema()
    out = tmp_path / "policy.schema.json"
    assert main(["schema", "--write", str(out)]) == 0
    assert main(["schema", "--check", str(out)]) == 0
    out.write_text("{}")
    assert main(["schema", "--check", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["schema", "--check", str(tmp_path / "missing.json")]) == 2


def test_the_schema_ships_in_the_wheel(tmp_path: Path) -> None:
    """Built from the source tree: the JSON file is package data, next to py.typed."""
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "quota_middleware/policy.schema.json" in names
    assert "quota_middleware/py.typed" in names
