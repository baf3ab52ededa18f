"""Reports of a scan: an aligned table, JSON, SARIF 2.1.0 (for code-scanning upload), and
baselines (known findings to accept, kept as SHA-256 fingerprints of the keys).

No report holds a whole key: a finding shows its masked form (first 6 and last 4 characters) and
its fingerprint, nothing else of the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from quota_middleware.errors import InvalidArgument
from quota_middleware.leaks._files import FileResult
from quota_middleware.leaks._patterns import KINDS, Finding

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL = "quota-middleware scan"
BASELINE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Located:
    """A finding and the file it is in."""

    path: str
    finding: Finding

    @property
    def where(self) -> str:
        return f"{self.path}:{self.finding.line}:{self.finding.column}"


def located(results: Iterable[FileResult]) -> list[Located]:
    return [Located(r.path, f) for r in results for f in r.findings]


def apply_baseline(found: Sequence[Located], accepted: set[str]) -> list[Located]:
    """The findings whose key is not in the baseline."""
    return [x for x in found if x.finding.fingerprint not in accepted]


# -- table ----------------------------------------------------------------------------------------

COLUMNS = ("LOCATION", "PROVIDER", "KIND", "KEY", "HIDDEN")


def table(found: Sequence[Located]) -> str:
    """One aligned line per finding: ``file:line:col``, provider, kind, masked key, how hidden."""
    rows = [COLUMNS] + [
        (x.where, x.finding.provider, x.finding.kind, x.finding.masked, x.finding.how)
        for x in found
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def summary(found: Sequence[Located], results: Sequence[FileResult], accepted: int = 0) -> str:
    scanned = [r for r in results if r.skipped is None]
    size = sum(r.size for r in scanned)
    files = len({x.path for x in found})
    text = (
        f"{len(found)} key{'s' * (len(found) != 1)} found in {files} "
        f"file{'s' * (files != 1)}; {len(scanned)} scanned ({size / 1e6:.1f} MB), "
        f"{len(results) - len(scanned)} skipped"
    )
    if accepted:
        text += f", {accepted} accepted by the baseline"
    return text


# -- JSON ------------------------------------------------------------------------------------------


def record(x: Located) -> dict[str, Any]:
    f = x.finding
    return {
        "file": x.path,
        "line": f.line,
        "column": f.column,
        "offset": f.offset,
        "rule": f.rule,
        "provider": f.provider,
        "kind": f.kind,
        "masked": f.masked,
        "fingerprint": f.fingerprint,
        "hidden": list(f.hidden),
        "how": f.how,
    }


def to_json(
    found: Sequence[Located], results: Sequence[FileResult], accepted: int = 0
) -> dict[str, Any]:
    scanned = [r for r in results if r.skipped is None]
    return {
        "findings": [record(x) for x in found],
        "summary": {
            "findings": len(found),
            "accepted_by_baseline": accepted,
            "files_scanned": len(scanned),
            "bytes_scanned": sum(r.size for r in scanned),
            "files_skipped": len(results) - len(scanned),
        },
        "skipped": [{"file": r.path, "reason": r.skipped} for r in results if r.skipped],
    }


# -- SARIF 2.1.0 -----------------------------------------------------------------------------------


def _uri(path: str) -> str:
    if path == "-":
        return "stdin"
    p = PurePath(path)
    return p.as_posix().removeprefix("./") if not p.is_absolute() else p.as_uri()


def to_sarif(found: Sequence[Located], *, version: str = "0") -> dict[str, Any]:
    """A SARIF 2.1.0 log: one rule per key format, one ``error`` result per finding, located by
    file, line and column, with the key's fingerprint as ``partialFingerprints`` (so code
    scanning tracks a finding across commits) and never the key."""
    rules = sorted({x.finding.rule for x in found})
    index = {r: i for i, r in enumerate(rules)}
    descriptors = []
    for r in rules:
        k = KINDS[r]
        descriptors.append(
            {
                "id": r,
                "name": f"{k.provider} {k.kind}".title().replace(" ", "").replace("-", ""),
                "shortDescription": {"text": f"Leaked {k.provider} {k.kind}"},
                "fullDescription": {
                    "text": f"A {k.provider} {k.kind} is in the scanned files, in plain sight "
                    "or behind an encoding that anyone who has the file can undo."
                },
                "help": {"text": k.hint},
                "defaultConfiguration": {"level": "error"},
                "properties": {"tags": ["security", "secret"]},
            }
        )
    results = []
    for x in found:
        f = x.finding
        results.append(
            {
                "ruleId": f.rule,
                "ruleIndex": index[f.rule],
                "level": "error",
                "message": {
                    "text": f"{f.provider} {f.kind} {f.masked} ({f.how}). {KINDS[f.rule].hint}"
                },
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": _uri(x.path)},
                            "region": {"startLine": f.line, "startColumn": f.column},
                        }
                    }
                ],
                "partialFingerprints": {"keySha256/v1": f.fingerprint.removeprefix("sha256:")},
                "properties": {"hidden": list(f.hidden), "masked": f.masked},
            }
        )
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL,
                        "version": version,
                        "informationUri": "https://pypi.org/project/quota-middleware/",
                        "rules": descriptors,
                    }
                },
                "columnKind": "utf16CodeUnits",
                "results": results,
            }
        ],
    }


# -- baselines -------------------------------------------------------------------------------------


def baseline(found: Sequence[Located]) -> dict[str, Any]:
    """A baseline accepting these findings: fingerprints (and, to tell them apart, the rule,
    masked key and first place), never the keys."""
    seen: dict[str, Located] = {}
    for x in found:
        seen.setdefault(x.finding.fingerprint, x)
    return {
        "version": BASELINE_VERSION,
        "tool": TOOL,
        "accepted": [
            {
                "fingerprint": fp,
                "rule": x.finding.rule,
                "masked": x.finding.masked,
                "first_seen": x.where,
            }
            for fp, x in sorted(seen.items())
        ],
    }


def read_baseline(text: str, where: str = "baseline") -> set[str]:
    """The accepted fingerprints of a baseline document; :class:`InvalidArgument` if it is not
    one."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{where}: not JSON ({e})") from None
    entries = doc.get("accepted") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or doc.get("version") != BASELINE_VERSION:
        raise InvalidArgument(
            f"{where}: not a quota-middleware scan baseline (expected version "
            f"{BASELINE_VERSION} and an 'accepted' list; write one with --write-baseline)"
        )
    out = set()
    for i, entry in enumerate(entries):
        fp = entry.get("fingerprint") if isinstance(entry, dict) else None
        if not isinstance(fp, str) or not fp.startswith("sha256:") or len(fp) != 71:
            raise InvalidArgument(f"{where}: accepted[{i}].fingerprint: expected sha256:<64 hex>")
        out.add(fp)
    return out
