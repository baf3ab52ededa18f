"""Reading what to scan: directories (recursively), single files and streams, fed to the pure
:class:`~._scanner.Scanner` in chunks.

A file is read in chunks of ``chunk_size`` bytes (1 MiB by default) and never whole, so a 200 MB
bundle costs the chunk plus the scanner's fixed overlap. Binary files are skipped: a known binary
extension, or a NUL byte in the first 8 KiB (what git does). ``node_modules`` is skipped unless
asked for; version-control folders always are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from quota_middleware.leaks._patterns import Finding
from quota_middleware.leaks._scanner import Scanner

CHUNK_SIZE = 1 << 20
SNIFF = 8192
VCS_DIRS = frozenset({".git", ".hg", ".svn"})
#: Extensions that are never text worth scanning (images, fonts, archives, media, binaries).
BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .webp .avif .ico .bmp .tif .tiff .psd .woff .woff2 .ttf .otf .eot .zip "
    ".gz .tgz .bz2 .xz .zst .br .7z .rar .tar .jar .war .pdf .mp3 .mp4 .m4a .ogg .wav .webm .mov "
    ".avi .wasm .so .dylib .dll .exe .bin .o .a .class .pyc .pyo .node .sqlite .db".split()
)


@dataclass(slots=True)
class FileResult:
    """What scanning one file (or stream) gave: its findings, or why it was skipped."""

    path: str  # as given or found (relative to the argument it came from), "-" for stdin
    findings: list[Finding] = field(default_factory=list)
    size: int = 0
    skipped: str | None = None  # "binary", or an error text


def _extra_steps(name: str) -> tuple[str, ...]:
    base = os.path.basename(name)
    if base == ".env" or base.startswith(".env.") or base.endswith(".env"):
        return (".env file",)
    return ()


def scan_stream(
    stream: BinaryIO,
    name: str,
    *,
    own_prefixes: Sequence[str] = ("qm",),
    chunk_size: int = CHUNK_SIZE,
    sniff: bool = True,
) -> FileResult:
    """Scan a binary stream chunk by chunk (stdin, an open file)."""
    result = FileResult(name)
    scanner = Scanner(own_prefixes=own_prefixes, extra_steps=_extra_steps(name))
    first = True
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        if first and sniff and b"\0" in chunk[:SNIFF]:
            result.skipped = "binary"
            return result
        first = False
        result.size += len(chunk)
        result.findings.extend(scanner.feed(chunk))
    result.findings.extend(scanner.close())
    return result


def scan_file(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    own_prefixes: Sequence[str] = ("qm",),
    chunk_size: int = CHUNK_SIZE,
) -> FileResult:
    """Scan one file; an unreadable or binary file is a result with ``skipped`` set."""
    shown = name if name is not None else os.fspath(path)
    if Path(path).suffix.lower() in BINARY_SUFFIXES:
        return FileResult(shown, skipped="binary")
    try:
        with open(path, "rb") as f:
            return scan_stream(f, shown, own_prefixes=own_prefixes, chunk_size=chunk_size)
    except OSError as e:
        return FileResult(shown, skipped=f"unreadable: {e.strerror or type(e).__name__}")


def iter_files(root: Path, *, include_node_modules: bool = False) -> Iterator[Path]:
    """Files under ``root`` (or ``root`` itself), sorted, without following directory links."""
    if not root.is_dir():
        yield root
        return
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if d not in VCS_DIRS and (include_node_modules or d != "node_modules")
        )
        for f in sorted(files):
            p = Path(top, f)
            if p.is_file():
                yield p


def scan_paths(
    paths: Iterable[str],
    *,
    include_node_modules: bool = False,
    own_prefixes: Sequence[str] = ("qm",),
    chunk_size: int = CHUNK_SIZE,
    stdin: BinaryIO | None = None,
) -> Iterator[FileResult]:
    """Scan each path (a directory recursively, a file, or ``-`` for ``stdin``), in order."""
    for arg in paths:
        if arg == "-":
            if stdin is not None:
                yield scan_stream(stdin, "-", own_prefixes=own_prefixes, chunk_size=chunk_size)
            continue
        for p in iter_files(Path(arg), include_node_modules=include_node_modules):
            yield scan_file(p, own_prefixes=own_prefixes, chunk_size=chunk_size)
