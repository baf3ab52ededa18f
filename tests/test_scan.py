"""The leaked-key scanner (quota_middleware.leaks, ``quota-middleware scan``).

Every key here is generated at run time by bench/scan_corpus.py in its provider's published shape
(nothing key-shaped is committed). The corpus covers every provider x every hiding form, inside
multi-MB minified bundles and source maps; a clean corpus of look-alikes must give nothing; no
output (table, JSON, SARIF, baseline, stderr) may hold a whole key.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from quota_middleware.cli import main
from quota_middleware.errors import InvalidArgument
from quota_middleware.identity._keyformat import generate_key
from quota_middleware.leaks import (
    KINDS,
    Scanner,
    encoded_forms,
    fingerprint,
    mask,
    scan_bytes,
    scan_file,
    scan_stream,
)
from quota_middleware.leaks._report import read_baseline

_spec = importlib.util.spec_from_file_location(
    "scan_corpus", Path(__file__).resolve().parents[1] / "bench" / "scan_corpus.py"
)
assert _spec is not None and _spec.loader is not None
corpus: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

RULES = sorted(corpus.RULES)
HIDINGS = sorted(corpus.HIDINGS)


def _key(rule: str, seed: int = 0) -> str:
    return corpus.make_key(rule, random.Random(f"{rule}/{seed}"))


def _plant(rule: str, hiding: str, key: str, seed: int = 0) -> str:
    _, hide = corpus.HIDINGS[hiding]
    return corpus.context(rule, hide(key, random.Random(seed)))


def _found(data: bytes, **kw: Any) -> list[tuple[str, str, str]]:
    return [(f.rule, f.key, f.how) for f in scan_bytes(data, **kw)]


# -- every provider x every hiding form -----------------------------------------------------------


def test_every_rule_has_a_generator_and_a_kind() -> None:
    assert set(corpus.RULES) == set(KINDS)


@pytest.mark.parametrize("hiding", HIDINGS)
@pytest.mark.parametrize("rule", RULES)
def test_every_provider_in_every_hiding_form_is_found_and_labelled(rule: str, hiding: str) -> None:
    key = _key(rule)
    code = "var a=1,b=[1,2];" * 40 + _plant(rule, hiding, key) + "function c(d){return d+1}" * 40
    label = corpus.HIDINGS[hiding][0]
    assert _found(code.encode()) == [(rule, key, label)]


@pytest.mark.parametrize("hiding", HIDINGS)
def test_every_hiding_form_inside_a_source_maps_sources_content(hiding: str) -> None:
    keys = {rule: _key(rule, 1) for rule in ("openai/project", "anthropic/api", "azure/openai")}
    sources = {
        f"src/{rule.replace('/', '_')}.js": "import x from './x';\nexport const a = 1;\n"
        + _plant(rule, hiding, key)
        + '\nfunction f(s) { return s.replace(/"/g, "\\\\\\"") }\n'
        for rule, key in keys.items()
    }
    found = _found(corpus.source_map(sources))
    label = corpus.HIDINGS[hiding][0]
    want = label + " > source map" if label != "plain" else "source map"
    assert sorted(found) == sorted((rule, key, want) for rule, key in keys.items())


def test_a_multi_mb_minified_bundle_with_every_provider_and_form_planted() -> None:
    rng = random.Random(11)
    want, plants = {}, []
    for rule in RULES:
        for hiding in HIDINGS:
            key = corpus.make_key(rule, rng)
            want[key] = (rule, corpus.HIDINGS[hiding][0])
            plants.append(_plant(rule, hiding, key, rng.randrange(1 << 30)))
    data = corpus.bundle(4_000_000, plants, seed=11)
    assert data.count(b"\n") == 0 and len(data) > 4_000_000  # one minified line
    found = scan_bytes(data)
    assert {f.key: (f.rule, f.how) for f in found} == want
    assert len(found) == len(want)
    # positions are right: each finding's column points into the planted statement
    for f in found[:20]:
        assert f.line == 1 and f.column == f.offset + 1


def test_env_file_html_attribute_and_html_entities(tmp_path: Path) -> None:
    k1, k2, k3 = _key("openai/project", 2), _key("azure/openai", 2), _key("mistral/api", 2)
    env = tmp_path / "dist" / ".env"
    env.parent.mkdir()
    env.write_text(f"# copied into the build\nOPENAI_API_KEY={k1}\nAZURE_OPENAI_API_KEY={k2}\n"
                   f"MISTRAL_API_KEY={k3}\n")  # fmt: skip
    r = scan_file(env)
    assert [(f.rule, f.how, f.line, f.column) for f in r.findings] == [
        ("openai/project", ".env file", 2, 16),
        ("azure/openai", ".env file", 3, 22),
        ("mistral/api", ".env file", 4, 17),
    ]
    k4, k5 = _key("google/api", 3), _key("anthropic/admin", 3)
    entities = "".join(f"&#{ord(c)};" for c in k5)
    page = (f'<!doctype html><html><body>\n<div id="app" data-maps-key="{k4}"></div>\n'
            f'<meta name="k" content="{entities}"></body></html>')  # fmt: skip
    assert [(f.rule, f.how, f.line) for f in scan_bytes(page.encode())] == [
        ("google/api", "HTML attribute", 2),
        ("anthropic/admin", "HTML entities", 3),
    ]


def test_nested_hiding_is_labelled_in_the_order_applied() -> None:
    key = _key("groq/api", 4)
    b64 = corpus._b64(key)
    hexed = "".join(f"\\x{ord(c):02x}" for c in b64)
    # base64, then hex-escaped, then split into concatenated literals
    code = f'const k=atob("{hexed[:40]}"+"{hexed[40:]}");'
    assert _found(code.encode()) == [("groq/api", key, "base64 > hex escapes > concatenation")]


# -- look-alikes ---------------------------------------------------------------------------------


def test_a_clean_corpus_full_of_lookalikes_gives_nothing() -> None:
    text = "\n".join(corpus.lookalikes(seed=3)).encode()
    assert scan_bytes(text) == []
    assert scan_bytes(corpus.bundle(2_000_000, [], seed=5)) == []


@pytest.mark.parametrize(
    "text",
    [
        '<i class="sk-loading sk-spinner"></i>',
        'apiKey: "sk-..."',
        "sk-proj-" + "X" * 74 + "T3BlbkFJ" + "X" * 74,
        "sk-proj-" + "a1" * 37 + "T3BlbkFJ" + "a1" * 37,  # repeated, not random
        "sk-proj-" + "x" * 160,  # no marker
        "sk-ant-api03-" + "your-anthropic-key-here-" * 4 + "AA",
        "hf_thisIsAVeryLongIdentifierNameHere",
        "gsk_" + "0" * 52,
        'integrity="sha384-oqVuAfXRKap7fdgcCY5uykM6+R9GqQ8K/uxy9rx7HNQlGYl1kPzQho1wx4JwY8wC"',
        '{"id":"0f8fad5b-d9cb-469f-a165-70867728950e","sha":"da39a3ee5e6b4b0d3255bfef95601890afd80709"}',
        'const cacheKey="9e107d9d372bb6826bd81d3542a419d6";',  # 32 hex, nothing Azure near
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "the risk-assessment and task-runner (desk-booking) modules",
        "AIzaSyXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
    ],
)
def test_lookalikes_are_not_reported(text: str) -> None:
    assert scan_bytes(text.encode()) == []


def test_own_keys_need_a_valid_checksum_and_the_configured_prefix() -> None:
    good = generate_key("qm")
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")
    assert _found(f'k="{good}"'.encode()) == [("quota-middleware/api-key", good, "plain")]
    assert scan_bytes(f'k="{bad}"'.encode()) == []
    acme = generate_key("acme")
    assert scan_bytes(f'k="{acme}"'.encode()) == []
    assert _found(f'k="{acme}"'.encode(), own_prefixes=("acme",))[0][1] == acme
    with pytest.raises(InvalidArgument):
        Scanner(own_prefixes=("not a prefix",))


# -- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hiding", ["plain", "atob", "hex escapes", "concatenation"])
def test_a_key_split_across_the_chunk_boundary_is_found_once(hiding: str) -> None:
    key = _key("openai/service-account", 5)
    filler = ("var a=1;" * 1500).encode()
    snippet = _plant("openai/service-account", hiding, key).encode()
    data = filler + snippet + filler
    start = len(filler)
    for cut in range(start - 3, start + len(snippet) + 3, 7):
        s = Scanner()
        out = s.feed(data[:cut]) + s.feed(data[cut:]) + s.close()
        assert [(f.key, f.offset) for f in out] == [(key, scan_bytes(data)[0].offset)], cut


def test_many_tiny_chunks_give_what_one_buffer_gives() -> None:
    rng = random.Random(6)
    plants = [_plant(r, h, corpus.make_key(r, rng), 1) for r in RULES[:5] for h in HIDINGS]
    data = corpus.bundle(300_000, plants, seed=6).replace(b";", b";\n", 500)
    s = Scanner()
    out = []
    for i in range(0, len(data), 997):
        out += s.feed(data[i : i + 997])
    out += s.close()
    ref = scan_bytes(data)
    assert len(ref) == len(plants)
    assert [(f.offset, f.line, f.column, f.rule, f.how) for f in out] == [
        (f.offset, f.line, f.column, f.rule, f.how) for f in ref
    ]
    assert s.close() == [] and s.scanned == len(data)
    with pytest.raises(InvalidArgument):
        s.feed(b"more")


def test_a_50_mb_file_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    key = _key("xai/api", 7)
    block = corpus.bundle(1 << 20, [], seed=7)
    big = tmp_path / "vendor.min.js"
    with open(big, "wb") as f:
        for i in range(50):
            f.write(block)
            if i == 31:
                f.write(_plant("xai/api", "atob", key).encode())
    tracemalloc.start()
    try:
        result = scan_file(big, chunk_size=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size > 50 << 20
    assert [(f.key, f.how) for f in result.findings] == [(key, "base64")]
    assert result.findings[0].offset == 32 * len(block) + len('const apiKey=atob("')
    assert peak < 12 << 20, peak  # a few chunks, never the file


def test_binary_streams_and_files_are_skipped(tmp_path: Path) -> None:
    key = _key("openai/project", 8)
    blob = b"\x89PNG\r\n\x1a\n\0\0" + key.encode()
    assert scan_stream(io.BytesIO(blob), "x").skipped == "binary"
    (tmp_path / "logo.png").write_bytes(key.encode())
    assert scan_file(tmp_path / "logo.png").skipped == "binary"
    (tmp_path / "data.bin.js").write_bytes(blob)
    assert scan_file(tmp_path / "data.bin.js").skipped == "binary"


# -- the library surface ---------------------------------------------------------------------------


def test_findings_never_show_the_key() -> None:
    key = _key("anthropic/api", 9)
    (f,) = scan_bytes(f'x="{key}"'.encode())
    assert key not in repr(f) and key not in str(f)
    assert f.masked == key[:6] + "..." + key[-4:] == mask(key)
    assert f.fingerprint == fingerprint(key) and f.fingerprint.startswith("sha256:")
    assert (f.provider, f.kind, f.how) == ("Anthropic", "API key", "plain")


def test_encoded_forms_are_what_the_encodings_produce() -> None:
    import base64

    key = _key("openai/project", 10)
    forms = dict(encoded_forms(key))
    for shift in range(3):
        encoded = base64.b64encode(b"x" * shift + key.encode() + b"yz")
        assert forms[f"base64+{shift}"] in encoded
    assert forms["hex"] == key.encode().hex().encode()
    assert json.loads('"' + forms["\\u escapes"].decode() + '"') == key
    assert forms["raw"] == key.encode()


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """A small project: a dist bundle with hidden keys, a source map, a .env, node_modules with
    a key, a binary, and clean sources."""
    rng = random.Random(12)
    keys = []
    plants = []
    for rule, hiding in (("openai/project", "atob"), ("groq/api", "reversed"),
                         ("google/api", "plain"), ("azure/openai", "hex escapes")):  # fmt: skip
        k = corpus.make_key(rule, rng)
        keys.append(k)
        plants.append(_plant(rule, hiding, k))
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "app.min.js").write_bytes(corpus.bundle(200_000, plants, seed=12))
    k = corpus.make_key("huggingface/token", rng)
    keys.append(k)
    (tmp_path / "dist" / "app.min.js.map").write_bytes(
        corpus.source_map({"src/hf.js": _plant("huggingface/token", "concatenation", k)})
    )
    k = corpus.make_key("deepseek/api", rng)
    keys.append(k)
    (tmp_path / "dist" / ".env").write_text(f"DEEPSEEK_API_KEY={k}\n")
    (tmp_path / "node_modules" / "lib").mkdir(parents=True)
    hidden = corpus.make_key("xai/api", rng)
    (tmp_path / "node_modules" / "lib" / "index.js").write_text(f'module.exports="{hidden}"')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "clean.js").write_text("\n".join(corpus.lookalikes(seed=12)))
    (tmp_path / "src" / "logo.png").write_bytes(b"\x89PNG\0" + keys[0].encode())
    return tmp_path, keys + [hidden]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["scan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_key(keys: list[str], *texts: str) -> None:
    for text in texts:
        for k in keys:
            assert k not in text
            assert k[:-4] not in text and k[4:] not in text


def test_cli_table_exit_codes_and_node_modules(
    tree: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, keys = tree
    code, out, err = _run(capsys, str(root))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["LOCATION", "PROVIDER", "KIND", "KEY", "HIDDEN"]
    body = [line for line in lines[1:] if line.strip() and "found in" not in line]
    assert len(body) == 6
    assert any("app.min.js:1:" in line and "base64" in line for line in body)
    assert any("app.min.js.map" in line and "concatenation > source map" in line for line in body)
    assert any(".env:1:18" in line and ".env file" in line for line in body)
    assert "node_modules" not in out and "logo.png" not in out
    assert "6 keys found in 3 files" in out and "1 skipped" in out
    # the columns line up under their titles
    for title in ("PROVIDER", "KIND", "KEY", "HIDDEN"):
        at = lines[0].index(title)
        assert all(line[at - 1] == " " and line[at] != " " for line in body), title
    _no_key(keys, out, err)
    code, out, err = _run(capsys, str(root), "--include-node-modules")
    assert code == 1 and "node_modules" in out and "7 keys found" in out
    _no_key(keys, out, err)
    code, out, err = _run(capsys, str(root / "src"))
    assert code == 0 and out == "" and "0 keys found" in err


def test_cli_usage_errors_exit_2(
    tree: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tree
    code, _, err = _run(capsys, str(root / "nope"))
    assert code == 2 and "no such file or directory" in err
    with pytest.raises(SystemExit) as e:
        main(["scan"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["scan", str(root), "--json", "--sarif"])
    assert e.value.code == 2
    (root / "bad.json").write_text('{"version": 9}')
    code, _, err = _run(capsys, str(root), "--baseline", str(root / "bad.json"))
    assert code == 2 and "not a quota-middleware scan baseline" in err
    code, _, err = _run(capsys, str(root), "--baseline", str(root / "missing.json"))
    assert code == 2 and "cannot read baseline" in err
    code, _, err = _run(capsys, str(root), "--key-prefix", "no way")
    assert code == 2 and "--key-prefix" in err
    capsys.readouterr()


def test_cli_json(tree: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    root, keys = tree
    code, out, err = _run(capsys, str(root / "dist"), "--json")
    assert code == 1
    doc = json.loads(out)
    assert set(doc) == {"findings", "summary", "skipped"}
    assert doc["summary"]["findings"] == 6 and doc["summary"]["files_scanned"] == 3
    for f in doc["findings"]:
        assert set(f) == {"file", "line", "column", "offset", "rule", "provider", "kind",
                          "masked", "fingerprint", "hidden", "how"}  # fmt: skip
        assert f["rule"] in KINDS and len(f["fingerprint"]) == 71 and "..." in f["masked"]
    assert {f["fingerprint"] for f in doc["findings"]} == {fingerprint(k) for k in keys[:6]}
    _no_key(keys, out, err)


def _check_sarif(log: dict[str, Any]) -> None:
    """The parts of the SARIF 2.1.0 schema (sarif-schema-2.1.0.json) a log like ours touches:
    required properties, types, enums and minimums."""
    assert set(log) <= {"$schema", "version", "runs", "inlineExternalProperties", "properties"}
    assert log["version"] == "2.1.0" and isinstance(log["runs"], list)
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str) and driver["name"]
        ids = [r["id"] for r in driver["rules"]]
        assert len(ids) == len(set(ids))
        for r in driver["rules"]:
            assert isinstance(r["id"], str)
            for k in ("shortDescription", "fullDescription", "help"):
                assert isinstance(r[k]["text"], str)
            assert r["defaultConfiguration"]["level"] in ("none", "note", "warning", "error")
        assert run.get("columnKind") in (None, "utf16CodeUnits", "unicodeCodePoints")
        for res in run["results"]:
            assert isinstance(res["message"]["text"], str) and res["message"]["text"]
            assert res["level"] in ("none", "note", "warning", "error")
            assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
            assert res["ruleIndex"] >= -1
            for loc in res["locations"]:
                phys = loc["physicalLocation"]
                assert isinstance(phys["artifactLocation"]["uri"], str)
                assert phys["region"]["startLine"] >= 1 and phys["region"]["startColumn"] >= 1
            assert all(isinstance(v, str) for v in res["partialFingerprints"].values())


def test_cli_sarif(tree: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    root, keys = tree
    out_file = root / "scan.sarif"
    code, out, err = _run(capsys, str(root / "dist"), "--sarif", "-o", str(out_file))
    assert code == 1 and out == ""
    text = out_file.read_text()
    log = json.loads(text)
    _check_sarif(log)
    results = log["runs"][0]["results"]
    assert len(results) == 6
    assert {r["partialFingerprints"]["keySha256/v1"] for r in results} == {
        fingerprint(k).removeprefix("sha256:") for k in keys[:6]
    }
    assert all(not r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].startswith(
        "./") for r in results)  # fmt: skip
    _no_key(keys, text, out, err)


def test_cli_baseline(tree: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    root, keys = tree
    base = root / "baseline.json"
    code, out, err = _run(capsys, str(root / "dist"), "--write-baseline", str(base))
    assert code == 0 and "accepting 6 key(s)" in err
    text = base.read_text()
    _no_key(keys, text, out, err)
    assert read_baseline(text) == {fingerprint(k) for k in keys[:6]}
    code, out, err = _run(capsys, str(root / "dist"), "--baseline", str(base))
    assert code == 0 and "6 accepted by the baseline" in err
    # a new key is still reported
    new = _key("openrouter/api", 13)
    (root / "dist" / "late.js").write_text(f'fetch(u,{{headers:{{Authorization:"Bearer {new}"}}}})')
    code, out, err = _run(capsys, str(root / "dist"), "--baseline", str(base), "--json")
    assert code == 1
    doc = json.loads(out)
    assert [f["rule"] for f in doc["findings"]] == ["openrouter/api"]
    assert doc["summary"]["accepted_by_baseline"] == 6
    _no_key([*keys, new], out, err)


def test_the_real_command_reads_stdin_and_never_prints_a_key(
    tree: tuple[Path, list[str]],
) -> None:
    root, keys = tree
    data = (root / "dist" / "app.min.js").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "quota_middleware.cli", "scan", "-", str(root / "dist" / ".env")],
        input=data, capture_output=True, timeout=120,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, err
    assert out.count("-:1:") == 4 and ".env:1:18" in out
    _no_key(keys, out, err)
    clean = subprocess.run(
        [sys.executable, "-m", "quota_middleware.cli", "scan", "-"],
        input=b"const a = 'sk-loading';", capture_output=True, timeout=60,
    )  # fmt: skip
    assert clean.returncode == 0 and clean.stdout == b""
