"""Keyed digests of text that can name a patient (scan paths, file names), for what MLflow records.

A plain hash of a path gives the path back to anyone who can guess its layout: trying every patient ID
of six digits against ``sha1(".../DOE^JANE_PID123456/...")`` takes a second and a half. So the digest
is an HMAC under a secret key of this installation: the same path gives the same digest on this machine
(runs stay comparable with each other), and a reader of the MLflow store without the key learns nothing
from it. The key is ``$MEDVAE_DIGEST_KEY`` when set (the same value on several machines makes their
digests agree), else a random one kept in ``$XDG_CONFIG_HOME/medvae/digest.key`` (``~/.config/...``),
written on first use, readable by its owner only.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

KEY_ENV = "MEDVAE_DIGEST_KEY"
log = logging.getLogger("medvae")
_session_key: bytes | None = None  # when no key file can be kept: digests agree within this process only


def key_file() -> Path:
    """Where the installation's digest key is kept."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "medvae" / "digest.key"


def digest_key() -> bytes:
    """The secret key of :func:`keyed_digest` (see the module's text)."""
    global _session_key
    given = os.environ.get(KEY_ENV)
    if given:
        return given.encode("utf-8", "surrogateescape")
    path = key_file()
    try:
        return path.read_bytes().strip() or _new_key(path)
    except FileNotFoundError:
        try:
            return _new_key(path)
        except OSError:
            pass
    except OSError:
        pass
    if _session_key is None:
        _session_key = secrets.token_hex(32).encode()
        log.warning("cannot keep a digest key in %s: path digests in MLflow will not match those of other runs "
                    "(set %s to share one)", path, KEY_ENV)
    return _session_key


def _new_key(path: Path) -> bytes:
    """Write a fresh random key (owner-only); the key already there when another process won the race."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key


def keyed_digest(text: str, *, digits: int = 12, key: bytes | None = None) -> str:
    """``digits`` hex digits of the HMAC-SHA1 of ``text`` under ``key`` (default :func:`digest_key`).

    >>> keyed_digest("DOE^JANE_PID123456/ct.nii.gz", key=b"example")
    '1cd105f13bdb'
    """
    key = digest_key() if key is None else key
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha1).hexdigest()[:digits]
