"""Find private keys in clear in a directory tree: what a disk scan after a run must not find.

A finding is a private key anyone who can read the file can use without a secret:
an unencrypted PEM private key block (PKCS#8, PKCS#1, SEC1, OpenSSH), a DER private key
anywhere in a file (also base64-encoded, as in JSON or a database row), or a PKCS#12 that
opens without a password. Encrypted PEM/PKCS#8, password-protected PKCS#12 and blobs sealed
by ``certgate.pki.keystore`` are not findings. The keys that seal those (``master.key``,
``node.key``) are listed apart, with their modes, for the caller to judge.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_der_private_key, pkcs12

KEY_FILE_NAMES = frozenset({"master.key", "node.key"})
_PEM_KEY_RE = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")
# A DER SEQUENCE whose first member is INTEGER 0 or 1: the version of PKCS#8, PKCS#1 and
# SEC1 private keys (RFC 5208 §5, RFC 8017 A.1.2, RFC 5915 §3).
_DER_KEY_RE = re.compile(
    rb"\x30(?:[\x00-\x7f]|\x81[\x80-\xff]|\x82[\x01-\xff][\x00-\xff])\x02\x01[\x00\x01]"
)
_BASE64_RUN_RE = re.compile(rb"[A-Za-z0-9+/_-]{80,}={0,2}")


def clear_keys(blob: bytes) -> list[str]:
    """What in ``blob`` is a usable private key, described (empty: nothing found)."""
    found = [f"PEM {m.group(0).decode()}" for m in _PEM_KEY_RE.finditer(blob)
             if m.group(1) != b"ENCRYPTED "]  # fmt: skip
    found += [f"DER private key at byte {at}" for at in _der_keys(blob)]
    found += [f"base64 DER private key at byte {at}" for at in _base64_der_keys(blob)]
    if _opens_without_password(blob):
        found.append("PKCS#12 without a password")
    return found


def scan(root: Path) -> tuple[dict[Path, list[str]], dict[Path, int]]:
    """(findings by file, mode of each master/node key file) for every file under ``root``."""
    findings: dict[Path, list[str]] = {}
    key_files: dict[Path, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.name in KEY_FILE_NAMES:
            key_files[path] = path.stat().st_mode & 0o777
            continue
        if found := clear_keys(path.read_bytes()):
            findings[path] = found
    return findings, key_files


def _der_length(blob: bytes, at: int) -> int:
    """The total length of the DER element at ``at`` (header + content)."""
    first = blob[at + 1]
    if first < 0x80:
        return 2 + first
    size = first & 0x7F
    return 2 + size + int.from_bytes(blob[at + 2 : at + 2 + size], "big")


def _der_keys(blob: bytes) -> Iterator[int]:
    for match in _DER_KEY_RE.finditer(blob):
        at = match.start()
        length = _der_length(blob, at)
        if at + length > len(blob):
            continue
        try:
            load_der_private_key(blob[at : at + length], None)
        except (ValueError, TypeError):
            continue
        yield at


def _base64_der_keys(blob: bytes) -> Iterator[int]:
    for match in _BASE64_RUN_RE.finditer(blob):
        text = match.group(0)
        for altchars in (b"+/", b"-_"):
            try:
                decoded = base64.b64decode(text + b"=" * (-len(text) % 4), altchars=altchars)
            except (binascii.Error, ValueError):
                continue
            if next(_der_keys(decoded), None) is not None or _opens_without_password(decoded):
                yield match.start()
                break


def _opens_without_password(blob: bytes) -> bool:
    if not blob.startswith(b"\x30"):
        return False
    for password in (None, b""):
        try:
            key, _, _ = pkcs12.load_key_and_certificates(blob, password)
        except (ValueError, TypeError):
            continue
        if key is not None:
            return True
    return False
