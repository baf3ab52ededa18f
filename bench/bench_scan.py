"""Benchmark of ``quota-middleware scan``: speed on minified JavaScript, recall and false positives
on a generated corpus, against detect-secrets and secretlint on the same corpus.

    python bench/bench_scan.py                 # 40 MB of bundles, 5 rounds, peers if installed
    python bench/bench_scan.py --setup         # first install the peers (pip venv + npm), outside
                                               # the repository (~/.cache/quota-middleware-bench)
    python bench/bench_scan.py --write         # ... and write bench/results_scan.md
    python bench/bench_scan.py --quick         # smoke test: 2 MB, 1 round, no peers (~2 s)

The corpus (bench/scan_corpus.py, generated each run from a seed, nothing committed):

- ``dist/bundle-N.min.js``: one-line minified bundles with keys planted: every provider x every
  hiding form (plain, atob, Buffer.from base64/hex, a bare base64 string, hex and unicode escapes,
  URL-encoding, fromCharCode, reversed, concatenated, joined arrays, base64 split by +), twice;
- ``dist/app.min.js.map``: a source map whose ``sourcesContent`` holds each provider in a few
  hidings; ``dist/.env``: each provider plainly; ``dist/index.html``: keys in attributes, plain and
  as HTML entities;
- ``clean/``: look-alikes only (CSS classes, placeholders, SRI hashes, UUIDs, commit hashes, data
  URLs, JWTs, words), where every report is a false positive.

Speed is MB/s over the bundles (the scanner in this process, one core, files read in 1 MiB
chunks), the median of ``--rounds``. Recall counts a planted key found when the tool names that
key: ours and secretlint report the key (ours masked, a fingerprint checked here), detect-secrets
a SHA-1 of the string it flagged. A peer "flags" a plant when it reports the hidden form's string
without recognising a key in it (detect-secrets' entropy detectors do this for base64); that is
listed separately. False positives: reports that are no planted key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import scan_corpus as corpus  # noqa: E402

from quota_middleware.leaks import scan_file  # noqa: E402

TOOLS = Path(os.environ.get("QM_BENCH_TOOLS", Path.home() / ".cache" / "quota-middleware-bench"))
DS = TOOLS / "detect-secrets" / "bin" / "detect-secrets"
SL = TOOLS / "secretlint" / "node_modules" / ".bin" / "secretlint"
SL_RC = {"rules": [{"id": "@secretlint/secretlint-rule-preset-recommend"}]}
SEPARATE = {"source map", ".env file", "HTML attribute", "HTML entities"}


@dataclass
class Plant:
    file: str
    rule: str
    how: str
    key: str
    strings: set[str] = field(default_factory=set)  # the literals of its snippet


@dataclass
class Corpus:
    root: Path
    plants: list[Plant]
    bundles: list[Path]
    clean: list[Path]

    @property
    def bundle_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.bundles)


_LITERAL = re.compile(r""""((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'""")


def _strings(snippet: str) -> set[str]:
    return {a or b for a, b in _LITERAL.findall(snippet) if len(a or b) >= 8}


def build(root: Path, mb: float, seed: int = 1) -> Corpus:
    rng = random.Random(seed)
    plants: list[Plant] = []
    snippets: list[tuple[Plant, str]] = []
    for _ in range(2):
        for rule in sorted(corpus.RULES):
            for _hiding, (label, hide) in sorted(corpus.HIDINGS.items()):
                key = corpus.make_key(rule, rng)
                snippet = corpus.context(rule, hide(key, rng))
                snippets.append((Plant("", rule, label, key, _strings(snippet)), snippet))
    rng.shuffle(snippets)
    dist = root / "dist"
    dist.mkdir(parents=True)
    n_files = max(1, round(mb / 10))
    size = int(mb * 1e6 / n_files)
    bundles = []
    per = -(-len(snippets) // n_files)
    for i in range(n_files):
        part = snippets[i * per : (i + 1) * per]
        path = dist / f"bundle-{i}.min.js"
        path.write_bytes(corpus.bundle(size, [s for _, s in part], seed=seed + i))
        for p, _ in part:
            p.file = str(path.relative_to(root))
            plants.append(p)
        bundles.append(path)
    # a source map, an .env and an HTML page
    sources = {}
    for rule in sorted(corpus.RULES):
        for hiding in ("plain", "atob", "concatenation", "hex escapes"):
            label, hide = corpus.HIDINGS[hiding]
            key = corpus.make_key(rule, rng)
            name = f"src/{rule.replace('/', '-')}-{hiding.replace(' ', '-')}.js"
            sources[name] = "export const a = 1;\n" + corpus.context(rule, hide(key, rng)) + "\n"
            how = "source map" if label == "plain" else f"{label} > source map"
            plants.append(Plant("dist/app.min.js.map", rule, how, key, {key}))
    (dist / "app.min.js.map").write_bytes(corpus.source_map(sources))
    env = []
    for rule in sorted(corpus.RULES):
        key = corpus.make_key(rule, rng)
        name = {"azure/openai": "AZURE_OPENAI_API_KEY", "mistral/api": "MISTRAL_API_KEY"}.get(
            rule, rule.split("/")[0].upper().replace("-", "_") + "_KEY"
        )
        env.append(f"{name}={key}")
        plants.append(Plant("dist/.env", rule, ".env file", key, {key}))
    (dist / ".env").write_text("\n".join(env) + "\n")
    html = ["<!doctype html><html><body>"]
    for rule in ("openai/project", "anthropic/api", "google/api", "groq/api", "xai/api"):
        k1, k2 = corpus.make_key(rule, rng), corpus.make_key(rule, rng)
        html.append(f'<div data-key="{k1}"></div>')
        html.append('<meta name="k" content="' + "".join(f"&#{ord(c)};" for c in k2) + '">')
        plants.append(Plant("dist/index.html", rule, "HTML attribute", k1, {k1}))
        plants.append(Plant("dist/index.html", rule, "HTML entities", k2, set()))
    (dist / "index.html").write_text("\n".join(html) + "</body></html>\n")
    clean_dir = root / "clean"
    clean_dir.mkdir()
    clean = []
    for i in range(3):
        path = clean_dir / f"lookalikes-{i}.js"
        path.write_text("\n".join(corpus.lookalikes(seed=seed + i)))
        clean.append(path)
    return Corpus(root, plants, bundles, clean)


# -- the tools ------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    found: set[str] = field(default_factory=set)  # planted keys named
    flagged: set[str] = field(default_factory=set)  # planted keys whose hidden form was flagged
    false_positives: int = 0
    seconds: float = 0.0
    note: str = ""


def run_ours(c: Corpus, rounds: int) -> tuple[Outcome, list[float]]:
    keys = {p.key for p in c.plants}
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for path in c.bundles:
            scan_file(path)
        rates.append(c.bundle_bytes / (time.perf_counter() - t) / 1e6)
    out = Outcome("quota-middleware scan")
    t = time.perf_counter()
    for path in sorted(p for p in c.root.rglob("*") if p.is_file()):
        for f in scan_file(path).findings:
            if f.key in keys:
                out.found.add(f.key)
            else:
                out.false_positives += 1
    out.seconds = time.perf_counter() - t
    return out, rates


def run_detect_secrets(c: Corpus, exe: Path) -> Outcome:
    out = Outcome("detect-secrets")
    t = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "scan", "--all-files", "."], cwd=c.root, capture_output=True, text=True
    )
    out.seconds = time.perf_counter() - t
    if proc.returncode != 0:
        out.note = f"failed: {proc.stderr[-300:]}"
        return out
    by_hash = {hashlib.sha1(p.key.encode()).hexdigest(): p for p in c.plants}
    by_string = {hashlib.sha1(s.encode()).hexdigest(): p for p in c.plants for s in p.strings}
    seen: set[tuple[str, str]] = set()
    for file, results in json.loads(proc.stdout)["results"].items():
        for r in results:
            h = r["hashed_secret"]
            if (file, h) in seen:
                continue  # several detectors on the same string
            seen.add((file, h))
            if h in by_hash:
                out.found.add(by_hash[h].key)
            elif h in by_string:
                out.flagged.add(by_string[h].key)
            else:
                out.false_positives += 1
    out.flagged -= out.found
    return out


def run_secretlint(c: Corpus, exe: Path) -> Outcome:
    out = Outcome("secretlint")
    rc = c.root / ".secretlintrc.json"
    rc.write_text(json.dumps(SL_RC))
    t = time.perf_counter()
    # a report file, not stdout: node cuts a multi-MB report short when it exits into a pipe
    report_file = c.root.parent / f"{c.root.name}-secretlint.json"
    proc = subprocess.run(
        [str(exe), "--secretlintrc", str(rc), "--format", "json", "--no-maskSecrets",
         "--output", str(report_file), "**/*", "**/.env"],
        cwd=c.root, capture_output=True, text=True,
    )  # fmt: skip
    out.seconds = time.perf_counter() - t
    rc.unlink()
    try:
        reports = json.loads(report_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        out.note = f"failed: {(proc.stderr or proc.stdout)[-300:]}"
        return out
    finally:
        report_file.unlink(missing_ok=True)
    keys = {p.key for p in c.plants}
    for report in reports:
        text = Path(report["filePath"]).read_bytes().decode("utf-8", "replace")
        for m in report["messages"]:
            got = text[m["range"][0] : m["range"][1]]
            if got in keys:
                out.found.add(got)
            elif any(k in got for k in keys):
                out.found.update(k for k in keys if k in got)
            else:
                out.false_positives += 1
    return out


def setup() -> None:
    """Install the peers outside the repository: detect-secrets in a venv, secretlint with npm."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    if not DS.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS / "detect-secrets")], check=True)
        pip = TOOLS / "detect-secrets" / "bin" / "pip"
        subprocess.run([str(pip), "install", "-q", "detect-secrets==1.5.0"], check=True)
    if not SL.exists():
        npm = shutil.which("npm")
        if npm is None:
            print("npm not found: secretlint cannot be installed here", file=sys.stderr)
            return
        d = TOOLS / "secretlint"
        d.mkdir(exist_ok=True)
        subprocess.run(
            [npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(d),
             "secretlint@12", "@secretlint/secretlint-rule-preset-recommend@12"],
            check=True,
        )  # fmt: skip


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return "?"


# -- the report -----------------------------------------------------------------------------------


def _by_form(c: Corpus, found: set[str]) -> dict[str, tuple[int, int]]:
    forms: dict[str, list[int]] = {}
    for p in c.plants:
        base = p.how.split(" > source map")[0] if p.how.endswith("source map") else p.how
        label = "source map (any form)" if p.how.endswith("source map") else base
        row = forms.setdefault(label, [0, 0])
        row[0] += p.key in found
        row[1] += 1
    return {k: (v[0], v[1]) for k, v in forms.items()}


def render(c: Corpus, rates: list[float], outcomes: list[Outcome], notes: Iterable[str]) -> str:
    total = len(c.plants)
    lines = [
        "# quota-middleware scan benchmark",
        "",
        "Produced by `python bench/bench_scan.py --write` (see the docstring of bench_scan.py).",
        "",
        "## Machine",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- cpu: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}",
        f"- python: {platform.python_implementation()} {platform.python_version()}",
        *(f"- {n}" for n in notes),
        "",
        "## Speed (minified JavaScript, one core)",
        "",
        f"{len(c.bundles)} one-line bundles, {c.bundle_bytes / 1e6:.1f} MB, "
        f"{sum(1 for p in c.plants if p.file.startswith('dist/bundle'))} keys planted; files read "
        "in 1 MiB chunks.",
        "",
        "| rounds | median MB/s | min | max |",
        "|---:|---:|---:|---:|",
        f"| {len(rates)} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |",
        "",
        "## Recall and false positives, same corpus",
        "",
        f"{total} planted keys (every provider x every hiding form, twice, in the bundles; a "
        "source map, a .env and an HTML page), and a clean folder of look-alikes.",
        "",
        "| tool | keys found | recall | hidden form flagged, key not named | false positives "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        if o.note:
            lines.append(f"| {o.name} | - | - | - | - | {o.note} |")
            continue
        lines.append(
            f"| {o.name} | {len(o.found)} | {len(o.found) / total:.1%} | {len(o.flagged)} | "
            f"{o.false_positives} | {o.seconds:.1f} |"
        )
    ran = [o for o in outcomes if not o.note]
    lines += [
        "",
        "### Recall by hiding form",
        "",
        "| form | " + " | ".join(o.name for o in ran) + " |",
        "|---|" + "---:|" * len(ran),
    ]
    per_tool = [_by_form(c, o.found) for o in ran]
    for form in sorted(per_tool[0]):
        cells = [f"{t[form][0]}/{t[form][1]}" for t in per_tool]
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=40.0, help="MB of bundles (default 40)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 MB, 1 round, no peers")
    ap.add_argument("--setup", action="store_true", help="install the peers first")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--write", action="store_true", help="write bench/results_scan.md")
    ap.add_argument("--keep", metavar="DIR", help="build the corpus in DIR and keep it")
    args = ap.parse_args(argv)
    if args.quick:
        args.mb, args.rounds, args.no_peers = 2.0, 1, True
    if args.setup:
        setup()
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        c = build(root, args.mb)
        ours, rates = run_ours(c, args.rounds)
        outcomes = [ours]
        notes = []
        if not args.no_peers:
            if DS.exists():
                notes.append(f"detect-secrets: {_version([str(DS), '--version'])}")
                outcomes.append(run_detect_secrets(c, DS))
            else:
                outcomes.append(Outcome("detect-secrets", note="not installed (--setup)"))
            if SL.exists():
                notes.append(f"secretlint: {_version([str(SL), '--version'])}, preset-recommend")
                outcomes.append(run_secretlint(c, SL))
            else:
                why = "npm not on PATH" if shutil.which("npm") is None else "--setup"
                outcomes.append(Outcome("secretlint", note=f"not installed ({why})"))
        text = render(c, rates, outcomes, notes)
    print(text)
    if args.write:
        (HERE / "results_scan.md").write_text(text)
    missed = len(c.plants) - len(ours.found)
    if missed or ours.false_positives:
        print(f"FAILED: {missed} planted keys missed, {ours.false_positives} false positives")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
