"""Provider key formats: what a leaked AI key looks like, and the checks that tell a key from a
look-alike.

Every format here is anchored on a fixed prefix (or, for the two providers whose keys have none,
on a name or endpoint next to the value) and then checked for its exact length and alphabet,
OpenAI's marker, this library's own checksum, and for looking random: placeholders such as
``sk-proj-XXXX...``, CSS classes such as ``sk-loading``, words and repeated characters fail.

Sources for lengths and alphabets (public rule sets, cross-checked against each other):

- OpenAI: gitleaks ``cmd/generate/config/rules/openai.go``: project, service-account and admin
  keys are ``sk-(proj|svcacct|admin)-`` + 74 (or 58) + ``T3BlbkFJ`` + 74 (or 58) of
  ``[A-Za-z0-9_-]``; legacy user keys ``sk-`` + 20 + ``T3BlbkFJ`` + 20 alphanumerics.
  ``T3BlbkFJ`` is base64 of ``OpenAI``: the marker every OpenAI key carries.
- Anthropic: gitleaks ``anthropic.go``: ``sk-ant-api03-`` / ``sk-ant-admin01-`` + 93 of
  ``[A-Za-z0-9_-]`` + ``AA``.
- Google (Gemini, any Google API key): ``AIza`` + 35 of ``[A-Za-z0-9_-]``, 39 in all (gitleaks
  ``gcp.go``).
- Groq: ``gsk_`` + 52 alphanumerics (kingfisher's groq rule; gitleaks ``groq.go`` says 48, so both
  lengths are accepted).
- OpenRouter: ``sk-or-v1-`` + 64 lowercase hex (the format OpenRouter issues; the rule sets found
  agree on 64 hex).
- xAI: ``xai-`` + 80 alphanumerics (osv-scalibr ``veles/secrets/grokxaiapikey``).
- Hugging Face: ``hf_`` + 34 letters (gitleaks ``huggingface.go``).
- DeepSeek: ``sk-`` + 32 lowercase hex (the published scanners' rule; no marker, so the randomness
  checks carry it).
- Mistral: 32 alphanumerics and no prefix, so only as the value of a name that says Mistral
  (``MISTRAL_API_KEY=...``, ``mistralApiKey: "..."``).
- Azure OpenAI: 32 hex, no prefix, so only next to an Azure OpenAI endpoint
  (``*.openai.azure.com``) or as the value of an ``api-key`` header or an Azure key name.
- quota-middleware's own API keys: :mod:`quota_middleware.identity._keyformat` (prefix, 12-char
  key id, 32-char secret, CRC32 checksum, verified).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from quota_middleware.identity._keyformat import CHECKSUM_LEN, KEY_ID_LEN, SECRET_LEN, parse_key


@dataclass(frozen=True, slots=True)
class KeyKind:
    """One key format: who issues it and which kind of key it is."""

    rule: str  # a stable id: "openai/project"; SARIF's ruleId
    provider: str  # "OpenAI"
    kind: str  # "project key"
    hint: str = ""  # what to do about it, for reports


def _rotate(where: str) -> str:
    return f"Revoke this key in {where} and issue a new one; remove it from the shipped files."


OPENAI = "the OpenAI dashboard (API keys)"
KINDS: dict[str, KeyKind] = {
    k.rule: k
    for k in (
        KeyKind("openai/project", "OpenAI", "project key", _rotate(OPENAI)),
        KeyKind("openai/service-account", "OpenAI", "service account key", _rotate(OPENAI)),
        KeyKind("openai/admin", "OpenAI", "admin key", _rotate(OPENAI)),
        KeyKind("openai/legacy", "OpenAI", "legacy user key", _rotate(OPENAI)),
        KeyKind("anthropic/api", "Anthropic", "API key", _rotate("the Anthropic Console")),
        KeyKind("anthropic/admin", "Anthropic", "admin key", _rotate("the Anthropic Console")),
        KeyKind("google/api", "Google", "API key", _rotate("Google Cloud (APIs & Services)")),
        KeyKind("azure/openai", "Azure OpenAI", "resource key", _rotate("the Azure portal")),
        KeyKind("groq/api", "Groq", "API key", _rotate("the Groq console")),
        KeyKind("openrouter/api", "OpenRouter", "API key", _rotate("OpenRouter's settings")),
        KeyKind("xai/api", "xAI", "API key", _rotate("the xAI console")),
        KeyKind("huggingface/token", "Hugging Face", "access token", _rotate("Hugging Face")),
        KeyKind("deepseek/api", "DeepSeek", "API key", _rotate("the DeepSeek platform")),
        KeyKind("mistral/api", "Mistral", "API key", _rotate("Mistral's console")),
        KeyKind(
            "quota-middleware/api-key",
            "quota-middleware",
            "API key",
            "Rotate it: quota-middleware keys rotate KEY_ID --grace ...; remove it from the files.",
        ),
    )
}

# -- raw keys: one regex per prefix family, tried at an anchor's position --------------------------

_B64URL = rb"[A-Za-z0-9_-]"
_OPENAI_BODY = rb"(?:%s{74}T3BlbkFJ%s{74}|%s{58}T3BlbkFJ%s{58})" % ((_B64URL,) * 4)
#: After ``sk-``; the first group that matched names the kind. The right edge must not continue
#: the key's alphabet (a longer run is something else).
SK_RE = re.compile(
    rb"sk-(?:"
    rb"(?P<anthropic_api>ant-api03-[A-Za-z0-9_-]{93}AA)"
    rb"|(?P<anthropic_admin>ant-admin01-[A-Za-z0-9_-]{93}AA)"
    rb"|(?P<openrouter>or-v1-[0-9a-f]{64})"
    rb"|(?P<openai_project>proj-" + _OPENAI_BODY + rb")"
    rb"|(?P<openai_svc>svcacct-" + _OPENAI_BODY + rb")"
    rb"|(?P<openai_admin>admin-" + _OPENAI_BODY + rb")"
    rb"|(?P<openai_legacy>[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})"
    rb"|(?P<deepseek>[0-9a-f]{32})"
    rb")(?![A-Za-z0-9_-])"
)
_SK_RULES = {
    "anthropic_api": "anthropic/api",
    "anthropic_admin": "anthropic/admin",
    "openrouter": "openrouter/api",
    "openai_project": "openai/project",
    "openai_svc": "openai/service-account",
    "openai_admin": "openai/admin",
    "openai_legacy": "openai/legacy",
    "deepseek": "deepseek/api",
}
#: The other fixed prefixes, each with its rule and its whole-key regex.
PREFIX_RES: dict[bytes, tuple[str, re.Pattern[bytes]]] = {
    b"AIza": ("google/api", re.compile(rb"AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])")),
    b"gsk_": ("groq/api", re.compile(rb"gsk_(?:[A-Za-z0-9]{52}|[A-Za-z0-9]{48})(?![A-Za-z0-9_])")),
    b"xai-": ("xai/api", re.compile(rb"xai-[A-Za-z0-9]{80}(?![A-Za-z0-9_-])")),
    b"hf_": ("huggingface/token", re.compile(rb"hf_[A-Za-z]{34}(?![A-Za-z0-9_])")),
}
#: The prefixes whose raw form is anchored (the quota-middleware prefixes are added per scan).
PREFIXES: tuple[bytes, ...] = (b"sk-", *PREFIX_RES)
_OWN_SECRET = SECRET_LEN + CHECKSUM_LEN


def own_key_re(prefix: str) -> re.Pattern[bytes]:
    """A quota-middleware key of this prefix (its checksum is checked separately)."""
    p = re.escape(prefix.encode("ascii"))
    tail = rb"_[0-9A-Za-z]{%d}_[0-9A-Za-z]{%d}(?![0-9A-Za-z_])" % (KEY_ID_LEN, _OWN_SECRET)
    return re.compile(p + tail)


# -- keys without a prefix: Azure OpenAI and Mistral, only next to a name or endpoint --------------

#: A name whose value may be an Azure key: the ``api-key`` header, ``AZURE_OPENAI_API_KEY``,
#: ``azureOpenAIKey``; the value follows within a few characters (quotes, ``=``, ``:``).
AZURE_NAME_RE = re.compile(rb"(?i:api-key|azure[a-z0-9_-]{0,24}key)")
AZURE_ENDPOINT = b".openai.azure.com"
MISTRAL_NAME_RE = re.compile(rb"(?i:mistral[a-z0-9_-]{0,16}key)")
HEX32_RE = re.compile(rb"(?<![0-9A-Za-z_-])([0-9a-f]{32}|[0-9A-F]{32})(?![0-9A-Za-z_-])")
ALNUM32_RE = re.compile(rb"(?<![0-9A-Za-z_-])([0-9A-Za-z]{32})(?![0-9A-Za-z_-])")
#: What may stand between a name and its value: quotes, ``=``, ``:``, spaces.
VALUE_GAP_RE = re.compile(rb"""[\w-]*\\?["'`]?\s*[:=]\s*\\?["'`]?""")


# -- looking random --------------------------------------------------------------------------------

_PLACEHOLDER_WORDS = (
    "xxxx",
    "your",
    "example",
    "placeholder",
    "redacted",
    "replace",
    "insert",
    "dummy",
    "sample",
    "....",
)


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _max_run(text: str) -> int:
    best = run = 1
    for a, b in zip(text, text[1:], strict=False):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def looks_random(body: str, alphabet: int) -> bool:
    """Whether a key's variable part looks like generated randomness, not a placeholder, a word or
    an identifier: entropy near what a random string of its length and alphabet has, no long run of
    one character, no placeholder word, and (for mixed alphabets) more than one character class.

    The thresholds let through all but a vanishing share of truly random keys (see the benchmark's
    recall) while ``sk-proj-XXXX...``, ``sk-...`` and ``hf_someLongIdentifierName`` fail."""
    if len(body) < 16:
        return False
    low = body.lower()
    if any(w in low for w in _PLACEHOLDER_WORDS):
        return False
    if _max_run(body) >= (7 if alphabet <= 16 else 5):
        return False
    if entropy(body) < 0.75 * math.log2(min(len(body), alphabet)):
        return False
    if alphabet <= 16:  # hex: a key has digits and letters
        return any(c.isdigit() for c in body) and any(c.isalpha() for c in body)
    classes = sum(
        (
            any(c.islower() for c in body),
            any(c.isupper() for c in body),
            any(c.isdigit() for c in body),
        )
    )
    return classes >= 2


def _case_changes(body: str) -> int:
    return sum(1 for a, b in zip(body, body[1:], strict=False) if a.islower() != b.islower())


def check(rule: str, key: str) -> bool:
    """The structure and randomness checks of a key that matched ``rule``'s regex."""
    if rule.startswith("openai/") and rule != "openai/legacy":
        body = key.split("-", 2)[2].replace("T3BlbkFJ", "", 1)
        return looks_random(body, 64)
    if rule == "openai/legacy":
        return looks_random(key[3:].replace("T3BlbkFJ", "", 1), 62)
    if rule.startswith("anthropic/"):
        return looks_random(key.split("-", 3)[3][:-2], 64)
    if rule == "openrouter/api":
        return looks_random(key[9:], 16)
    if rule == "deepseek/api":
        return looks_random(key[3:], 16)
    if rule == "google/api":
        return looks_random(key[4:], 64)
    if rule == "groq/api":
        return looks_random(key[4:], 62)
    if rule == "xai/api":
        return looks_random(key[4:], 62)
    if rule == "huggingface/token":
        # Letters only: a camelCase identifier that happens to be 34 long has few case changes,
        # a random token about one every other letter.
        body = key[3:]
        return looks_random(body, 52) and _case_changes(body) >= 7
    if rule == "azure/openai":
        return looks_random(key, 16)
    if rule == "mistral/api":
        return looks_random(key, 62)
    return False


def check_own(key: str, prefix: str) -> bool:
    """A quota-middleware key: prefix and checksum verified (a made-up one fails the CRC)."""
    return parse_key(key, prefix) is not None


def match_sk(buf: bytes, pos: int) -> tuple[str, str, int] | None:
    """The (rule, key, end) of an ``sk-`` key starting at ``pos``, checked, or ``None``."""
    m = SK_RE.match(buf, pos)
    if m is None or m.lastgroup is None:
        return None
    rule = _SK_RULES[m.lastgroup]
    key = m.group().decode("ascii")
    return (rule, key, m.end()) if check(rule, key) else None


# -- the one thing reports may show ----------------------------------------------------------------


def mask(key: str) -> str:
    """The first 6 and the last 4 characters: enough to tell keys apart, useless to an attacker."""
    return f"{key[:6]}...{key[-4:]}" if len(key) > 12 else "*" * len(key)


def fingerprint(key: str) -> str:
    """``sha256:<hex>`` of the key: what baselines and JSON/SARIF keep, never the key."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Finding:
    """One key found. ``key`` is the whole key: it never appears in a repr, a report or a file;
    use :attr:`masked` and :attr:`fingerprint`.

    ``offset`` is the byte offset (in the scanned stream) where the hidden form of the key starts;
    ``line`` and ``column`` (1-based, columns in bytes) the same place; ``hidden`` the hiding steps
    in the order they were applied to the key (``("base64", "concatenation")``: base64-encoded,
    then split into concatenated literals), empty for a key in plain sight."""

    offset: int
    line: int
    column: int
    rule: str
    key: str = field(repr=False)
    hidden: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        return KINDS[self.rule].provider

    @property
    def kind(self) -> str:
        return KINDS[self.rule].kind

    @property
    def masked(self) -> str:
        return mask(self.key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def how(self) -> str:
        """The hiding steps as text: ``base64 > concatenation``, or ``plain``."""
        return " > ".join(self.hidden) if self.hidden else "plain"
