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
_short_said = False  # a short MEDVAE_DIGEST_KEY is warned about once


def key_file() -> Path:
    """Where the installation's digest key is kept."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # unset, or relative (which the XDG spec says to ignore: it moved with the cwd)
        base = str(Path.home() / ".config")
    return Path(base) / "medvae" / "digest.key"


#: a kept key shorter than this (an empty file left by a crash) is not used: an HMAC under it is public
MIN_KEY_BYTES = 32


def digest_key() -> bytes:
    """The secret key of :func:`keyed_digest` (see the module's text)."""
    global _short_said
    given = os.environ.get(KEY_ENV)
    if given:
        key = given.encode("utf-8", "surrogateescape")
        if len(key) < MIN_KEY_BYTES and not _short_said:
            _short_said = True
            log.warning("%s is %d bytes long: a short key can be guessed, and the path digests with it; give "
                        "%d or more (e.g. python -c 'import secrets; print(secrets.token_hex(32))')",
                        KEY_ENV, len(key), MIN_KEY_BYTES)
        return key
    path = key_file()
    try:
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            key = _new_key(path)
        if len(key) >= MIN_KEY_BYTES:
            return key
        why = f"the key in {path} is {len(key)} bytes long; remove the file to make a new one"
    except OSError as exc:
        why = f"cannot keep a digest key in {path} ({exc.strerror or exc})"
    return _session(why)


def _session(why: str) -> bytes:
    """A key for this process only, said once: digests then match no other run's."""
    global _session_key
    if _session_key is None:
        _session_key = secrets.token_hex(32).encode()
        log.warning("%s: path digests in MLflow will not match those of other runs (set %s to share one key)",
                    why, KEY_ENV)
    return _session_key


def _new_key(path: Path) -> bytes:
    """A fresh random key, written whole to a file of its own and linked into place (owner-only), or the
    key another process linked there first: one that created the name and then wrote it let a second
    process read it empty."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return key


def keyed_digest(text: str, *, digits: int = 12, key: bytes | None = None) -> str:
    """``digits`` hex digits of the HMAC-SHA1 of ``text`` under ``key`` (default :func:`digest_key`).

    >>> keyed_digest("DOE^JANE_PID123456/ct.nii.gz", key=b"example")
    '1cd105f13bdb'
    """
    key = digest_key() if key is None else key
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha1).hexdigest()[:digits]
