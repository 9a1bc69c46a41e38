"""Tracking-store URIs: which store a URI names, the embedded default, and URIs made safe to show.

Checked without contacting anything and without mlflow: a typo is refused at once, credentials never
reach a message or a file (:func:`redact`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medvae.errors import MedvaeError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"

#: tracking-store URI schemes MLflow 3 opens, as registered by
#: ``mlflow.tracking._tracking_service.utils._register_tracking_stores`` (see also
#: https://mlflow.org/docs/latest/self-hosting/architecture/backend-store): SQLAlchemy databases
#: (a driver may follow, ``postgresql+psycopg2``), a tracking server, Databricks and Unity Catalog.
#: File stores (a plain folder, ``file:``) are refused by MLflow 3 unless ``MLFLOW_ALLOW_FILE_STORE``
#: is set; plugins add their schemes through the ``mlflow.tracking_store`` entry points.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the explicit one, else ``MLFLOW_TRACKING_URI``, else the embedded default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact(uri: str) -> str:
    """``uri`` without a user name or password, for messages and files."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


def redact_text(text: str) -> str:
    """``text`` with the user name and password of every URL in it removed (MLflow's errors quote the
    request URL, credentials and all).

    >>> redact_text("API request to http://user:secret@host:5000/api/2.0/x failed")
    'API request to http://host:5000/api/2.0/x failed'
    """
    return _USERINFO.sub(r"\1", text)


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _scheme(uri: str) -> str:
    """The store kind of ``uri`` as MLflow picks it: ``postgresql`` for ``postgresql+psycopg2://``,
    ``""`` for a plain path (a Windows drive letter included)."""
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow takes these bare words as URIs
        return uri
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError:  # "http://[::1" (a broken IPv6 address): its scheme still tells a URL from a path
        head, sep, _ = uri.partition("://")
        scheme = head.lower() if sep and head.isascii() and head.replace("+", "").isalnum() else ""
    if len(scheme) == 1:
        return ""
    return scheme.split("+", 1)[0]


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins add (``mlflow.tracking_store`` entry points)."""
    from importlib.metadata import entry_points

    try:
        return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # a broken distribution's metadata must not stop the check
        return set()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("true", "1")


def check_uri(uri: str) -> None:
    """Raise a one-line :class:`MedvaeError` unless ``uri`` names a tracking store MLflow 3 opens.

    Checked without contacting anything (and without mlflow), so a typo is refused at once rather
    than as MLflow's registry traceback; whether the store itself opens is checked when it is opened.

    Examples
    --------
    >>> check_uri("sqlite:///mlruns/mlflow.db")
    >>> check_uri("foo://bar")   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: foo://bar: not an MLflow tracking URI: unknown scheme 'foo' (...)
    """
    scheme = _scheme(uri)
    where = redact(uri)
    if scheme in ("", "file"):
        if _env_true("MLFLOW_ALLOW_FILE_STORE"):  # MLflow's own opt-out of its refusal
            return
        raise MedvaeError("a folder (file store) is not a tracking store MLflow 3 opens; use a database "
                          "such as sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)", where)
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            ok = bool(parts.hostname) and (parts.port is None or parts.port > 0)
        except ValueError:  # a port out of range, a broken IPv6 address
            ok = False
        if not ok:
            raise MedvaeError(f"not a tracking server URL (expected {scheme}://HOST[:PORT])", where)
        return
    if scheme == "sqlite":
        db = uri.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
        if db in ("", ":memory:") or "mode=memory" in uri:  # SQLAlchemy's in-memory database
            raise MedvaeError("an in-memory database: its runs would be gone when the command ends; give a "
                              "file, such as sqlite:///mlruns/mlflow.db", where)
    if scheme in DATABASE_SCHEMES or scheme in SERVER_SCHEMES or scheme in _plugin_schemes():
        return
    known = ", ".join((*DATABASE_SCHEMES, *SERVER_SCHEMES))
    raise MedvaeError(f"not an MLflow tracking URI: unknown scheme {scheme!r} (MLflow opens {known})", where)


def _portable(uri: str) -> str:
    """``uri`` as it can be used from any folder: a relative sqlite path made absolute, no credentials."""
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return "sqlite:///" + str(db.resolve())
    return redact(uri)
