"""A JSON Schema (draft 2020-12) of the TOML policy file, generated from the configuration's own
types, so an editor (Taplo, "Even Better TOML", VS Code's JSON schema support) completes and
checks a policy as it is typed.

It is generated, never written by hand: every table is a dataclass of the policy
(:class:`~quota_middleware.QuotaConfig` and what it holds), every key one of its init fields,
typed from its annotations (``Literal`` -> ``enum``, ``Sequence`` -> array, ``Mapping`` ->
table, ``X | None`` -> X, which TOML spells by leaving the key out). What TOML spells
differently from the Python value is said once, in :data:`_TOML`: plans are a table by name,
limits carry a ``type``, Python-only keys (callables) are left out. The package ships the
result as ``policy.schema.json`` (``quota-middleware schema`` prints it); a test keeps the file
equal to :func:`policy_schema` and validates the examples' policies against it.

The schema checks shape (keys, types, enums), not every rule: ``__post_init__`` still checks
ranges and combinations when the policy loads, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from quota_middleware.config import Plan, QuotaConfig
from quota_middleware.limits import LIMIT_TYPES

__all__ = ["SCHEMA_ID", "policy_schema", "schema_json"]

SCHEMA_ID = "https://github.com/quota-middleware/quota-middleware/policy.schema.json"
_Schema = dict[str, Any]


def _lazy_tables() -> dict[tuple[type, str], type]:
    """Fields typed ``Any`` in their class (to keep its module light) and the dataclass their
    TOML table is read into."""
    from quota_middleware.admin._config import AdminConfig
    from quota_middleware.alerts._config import AlertsConfig

    return {(QuotaConfig, "alerts"): AlertsConfig, (QuotaConfig, "admin"): AdminConfig}


#: (class, field) -> the schema TOML spells it with, where that is not the Python value's
_TOML: dict[tuple[type, str], Callable[[], _Schema]] = {}


def _toml(cls: type, name: str) -> Callable[[Callable[[], _Schema]], Callable[[], _Schema]]:
    def register(fn: Callable[[], _Schema]) -> Callable[[], _Schema]:
        _TOML[(cls, name)] = fn
        return fn

    return register


@_toml(QuotaConfig, "plans")
def _plans() -> _Schema:
    plan = _table(Plan, skip=frozenset({"name"}))
    plan["properties"]["limits"] = {
        "type": "array",
        "description": "The plan's limits; each has a `type`.",
        "items": {"oneOf": [_limit(kind, cls) for kind, cls in LIMIT_TYPES.items()]},
    }
    return {
        "type": "object",
        "description": "The plans by name ([plans.NAME]).",
        "minProperties": 1,
        "additionalProperties": plan,
    }


@_toml(QuotaConfig, "prices")
def _prices() -> _Schema:
    usd = {"type": "number", "minimum": 0, "description": "USD per 1M tokens"}
    keys = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "audio_input",
            "audio_output", "cached_audio_input")  # fmt: skip
    return {
        "type": "object",
        "description": "Price overrides and additions by model, USD per 1M tokens.",
        "additionalProperties": {
            "type": "object",
            "properties": {k: usd for k in keys},
            "required": ["input", "output"],
            "additionalProperties": False,
        },
    }


@_toml(QuotaConfig, "default_price")
def _default_price() -> _Schema:
    schema = _prices()["additionalProperties"]
    return {**schema, "description": "The price of unpriced models (unpriced = 'default')."}


def _resolver() -> _Schema:
    return {
        "type": "string",
        "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        "description": "A caller resolver to import: 'package.module:function'.",
    }


def _limit(kind: str, cls: type) -> _Schema:
    table = _table(cls)
    table["properties"] = {"type": {"const": str(kind)}, **table["properties"]}
    table["required"] = ["type", *table.get("required", [])]
    return table


def _doc(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def _table(cls: type, skip: frozenset[str] = frozenset()) -> _Schema:
    """The schema of a table read into dataclass ``cls``: its init fields."""
    hints = typing.get_type_hints(cls)
    lazy = _lazy_tables()
    props: _Schema = {}
    required = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.name.startswith("_"):
            continue
        special = _TOML.get((cls, f.name))
        if special is not None:
            schema = special()
        elif (cls, f.name) in lazy:
            schema = _table(lazy[(cls, f.name)])
        elif f.name == "resolver":
            schema = _resolver()
        else:
            found = _type(hints[f.name])
            if found is None:
                continue  # Python-only (a callable): not in a policy file
            schema = found
        if f.default is not dataclasses.MISSING and _plain(f.default):
            schema = {**schema, "default": _jsonable(f.default)}
        props[f.name] = schema
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out: _Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if (doc := _doc(cls)) and cls is not QuotaConfig:
        out["description"] = doc
    if required:
        out["required"] = required
    return out


def _plain(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or (
        isinstance(value, tuple) and all(isinstance(v, str | int | float) for v in value)
    )


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _type(tp: Any) -> _Schema | None:
    """The schema of one annotation; None for what a policy file cannot hold."""
    if tp is Any:
        return {}
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        schemas = [s for a in options if (s := _type(a)) is not None]
        if not schemas:
            return None
        unique = []
        for s in schemas:
            if s not in unique:
                unique.append(s)
        return unique[0] if len(unique) == 1 else {"anyOf": unique}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is Callable or tp is Callable:
        return None
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp in (str, bytes, pathlib.Path) or tp == os.PathLike[str]:
        return {"type": "string"}
    if origin is not None and isinstance(origin, type):
        args = get_args(tp)
        if issubclass(origin, Mapping):
            value = _type(args[1]) if len(args) == 2 else {}
            return {"type": "object", "additionalProperties": value if value is not None else {}}
        if issubclass(origin, Sequence):
            item = _type(args[0]) if args else {}
            return None if item is None else {"type": "array", "items": item}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _table(tp)
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return {"type": "string"}
    return {}


def policy_schema() -> _Schema:
    """The JSON Schema of a policy file (a dict, ready for :func:`json.dumps`)."""
    root = _table(QuotaConfig)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "quota-middleware policy",
        "description": "The TOML policy file of quota-middleware (QuotaConfig.from_toml).",
        **root,
    }


def schema_json() -> str:
    """:func:`policy_schema` as the text of the shipped ``policy.schema.json``."""
    return json.dumps(policy_schema(), indent=2, sort_keys=False) + "\n"
