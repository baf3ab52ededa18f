"""Leaked-key detection: AI provider keys (and this library's own) in files, bundles and streams,
raw or hidden behind the encodings people wrongly trust to hide them.

The core is pure and streaming: :class:`Scanner` takes bytes in chunks and returns
:class:`Finding` values with offsets; :func:`scan_bytes` does one buffer. Reading files and
directories is :func:`scan_path`; reports (table, JSON, SARIF, baselines) are in ``_report``,
used by ``quota-middleware scan``. A finding never carries the key into any output: reports show
:attr:`Finding.masked` (first 6 and last 4 characters) and :attr:`Finding.fingerprint` (SHA-256).
"""

from __future__ import annotations

from quota_middleware.leaks._decode import encoded_forms
from quota_middleware.leaks._patterns import KINDS, Finding, KeyKind, fingerprint, mask
from quota_middleware.leaks._scanner import Scanner, scan_bytes

__all__ = [
    "KINDS",
    "Finding",
    "KeyKind",
    "Scanner",
    "encoded_forms",
    "fingerprint",
    "mask",
    "scan_bytes",
]
