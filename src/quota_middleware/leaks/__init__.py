"""Leaked-key detection: AI provider keys (and this library's own) in files, bundles and streams,
raw or hidden behind the encodings people wrongly trust to hide them.

The core is pure and streaming: :class:`Scanner` takes bytes in chunks and returns
:class:`Finding` values with offsets; :func:`scan_bytes` does one buffer; :func:`encoded_forms`
lists the forms a known key takes (for a guard on outgoing bodies). Reading files and
directories (chunked, binary files skipped) is :func:`scan_paths` / :func:`scan_file`; reports
(table, JSON, SARIF, baselines) are in ``_report``, used by ``quota-middleware scan``. A finding
never carries the key into any output: reports show :attr:`Finding.masked` (first 6 and last 4
characters) and :attr:`Finding.fingerprint` (SHA-256).
"""

from __future__ import annotations

from quota_middleware.leaks._decode import encoded_forms
from quota_middleware.leaks._files import FileResult, scan_file, scan_paths, scan_stream
from quota_middleware.leaks._patterns import KINDS, Finding, KeyKind, fingerprint, mask
from quota_middleware.leaks._scanner import Scanner, scan_bytes

__all__ = [
    "KINDS",
    "FileResult",
    "Finding",
    "KeyKind",
    "Scanner",
    "encoded_forms",
    "fingerprint",
    "mask",
    "scan_bytes",
    "scan_file",
    "scan_paths",
    "scan_stream",
]
